"""The HTTP server: both API shapes on one port, an API key on every route, CORS closed by default."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from garagelm.errors import GarageError
from garagelm.serve.common import ApiError
from garagelm.serve.models import ModelNotFound, ModelPool, NotEnoughMemory
from garagelm.serve.ollama_api import OllamaRoutes, _iso, keep_alive_seconds
from garagelm.serve.openai_api import OpenAIRoutes, error_body


class Server:
    def __init__(
        self,
        pool: ModelPool,
        api_key: str | None = None,
        cors_origins: list[str] | None = None,
        local_only: bool = True,
    ):
        """local_only: the server listens on a loopback address, so only loopback Host names are valid."""
        self.pool, self.api_key, self.cors_origins, self.local_only = (
            pool,
            api_key,
            cors_origins or [],
            local_only,
        )

    async def model(self, name: str, keep_alive=None):
        ttl = keep_alive_seconds(keep_alive) if not isinstance(keep_alive, float) else keep_alive
        try:
            return await asyncio.to_thread(self.pool.get, name, ttl)
        except ModelNotFound as e:
            status = 400 if "invalid model name" in str(e) else 404
            raise ApiError(status, str(e), code="model_not_found", param="model") from None
        except NotEnoughMemory as e:
            raise ApiError(503, str(e), code="insufficient_memory") from None
        except GarageError as e:
            raise ApiError(500, f"cannot load {name}: {e}") from None

    def ps(self) -> list[dict]:
        out = []
        for h in list(self.pool.held.values()):
            manifest = {
                "architecture": h.loaded.architecture,
                "quantization": h.info.get("quantization", ""),
            }
            expires = h.expires_at if h.expires_at != float("inf") else time.time() + 10 * 365 * 86400
            out.append({
                "name": h.name, "model": h.name, "size": h.size, "digest": "", "size_vram": 0,
                "context_length": h.ctx_size, "expires_at": _iso(expires), "busy": h.scheduler.busy,
                "details": {"format": "gguf", "family": manifest["architecture"]},
            })  # fmt: skip
        return out

    def app(self) -> Starlette:
        routes = OpenAIRoutes(self).routes() + OllamaRoutes(self).routes()
        from garagelm.serve.web import web_routes

        routes += web_routes()
        middleware = [
            Middleware(_Guard, key=self.api_key, origins=self.cors_origins, local_only=self.local_only)
        ]
        if self.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            middleware.insert(
                0,
                Middleware(
                    CORSMiddleware,
                    allow_origins=self.cors_origins,
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["Authorization", "Content-Type"],
                ),
            )
        handlers = {ApiError: _api_error, HTTPException: _http_error}
        return Starlette(
            routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=self._lifespan
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        async def reap():
            while True:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(self.pool.reap)

        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(self.pool.close)


def _respond(path: str, err: ApiError) -> JSONResponse:
    if path.startswith("/api/"):
        return JSONResponse({"error": err.message}, status_code=err.status)
    return JSONResponse(error_body(err), status_code=err.status)


async def _api_error(request, exc: ApiError):
    return _respond(request.url.path, exc)


async def _http_error(request, exc: HTTPException):
    return _respond(
        request.url.path, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    )


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class _Guard:
    """Checks every HTTP request before it reaches a route (plain ASGI, so streamed replies and
    client disconnects pass through untouched):
    - a browser request from another site (its Origin header) is refused unless --cors-origin
      allows it: CORS alone only hides the answer, the request would still run;
    - when serving this computer only, a Host header that is not a loopback name is refused,
      so a DNS-rebinding page cannot reach the server through its own domain;
    - with an API key, every route but the static page needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str | None, origins: list[str], local_only: bool):
        self.app, self.key, self.origins, self.local_only = app, key, set(origins), local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1")
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.local_only and hostname not in LOOPBACK_HOSTS:
            return await _deny(
                scope,
                send,
                ApiError(403, f"Host {host!r} refused: this server answers to 127.0.0.1 and localhost only"),
            )
        if origin and origin not in self.origins and origin.split("://", 1)[-1] != host:
            if scope.get("method") == "OPTIONS":
                return await self.app(scope, receive, send)  # a preflight: CORS answers it (no grant)
            why = f"a request from the web page at {origin} was refused; start garage serve with --cors-origin {origin} to allow it"
            return await _deny(scope, send, ApiError(403, why))
        # The page at / is static and holds no data; it asks for the key for its API calls.
        public = scope.get("path") == "/" and scope.get("method") == "GET"
        if self.key is None or scope.get("method") == "OPTIONS" or public:
            return await self.app(scope, receive, send)
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if hmac.compare_digest(token.encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        err = ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )
        return await _deny(scope, send, err, [(b"www-authenticate", b"Bearer")])


async def _deny(scope, send, err: ApiError, extra: list | None = None) -> None:
    path = scope.get("path", "")
    payload = json.dumps({"error": err.message} if path.startswith("/api/") else error_body(err)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
