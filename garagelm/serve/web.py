"""The chat page at /: one static file, no build step, nothing fetched from outside."""

from __future__ import annotations

from importlib import resources

from starlette.responses import HTMLResponse
from starlette.routing import Route


def web_routes() -> list[Route]:
    page = resources.files("garagelm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    async def index(request):
        # The page talks only to this server; the policy forbids anything else, inline or remote.
        csp = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
        return HTMLResponse(
            page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"}
        )

    return [Route("/", index, methods=["GET"])]
