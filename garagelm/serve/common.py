"""What both API shapes share: request checking, prompts within the context, running generations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from garagelm.errors import GarageError
from garagelm.runtime.batching import Request
from garagelm.runtime.sampling import SamplingParams
from garagelm.serve.models import Held

MAX_BODY = 4 << 20  # bytes of a request body


class Routes:
    """One API shape's handlers; `server` gives them models (garagelm.serve.app.Server)."""

    def __init__(self, server):
        self.server = server


class ApiError(Exception):
    """Answered as JSON in the calling API's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


async def read_json(request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"request body of {declared} bytes is over the {MAX_BODY}-byte limit")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"request body is over the {MAX_BODY}-byte limit")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def field(data: dict, name: str, kind, default=None, *, lo=None, hi=None, required: bool = False):
    """data[name] checked against a type and range; 400 naming the field otherwise."""
    if name not in data or data[name] is None:
        if required:
            raise ApiError(400, f"missing required field '{name}'", param=name)
        return default
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def stop_list(value, name: str = "stop") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return value
    raise ApiError(400, f"'{name}' must be a string or a list of at most 16 strings", param=name)


def check_context(held: Held, prompt: list[int], max_tokens: int | None) -> None:
    """Never truncate silently: a prompt (plus the asked reply) must fit the context."""
    ctx = held.ctx_size
    if len(prompt) >= ctx:
        raise ApiError(
            400,
            f"this model's context holds {ctx} tokens, but the prompt has {len(prompt)}; "
            "shorten the conversation or load the model with a larger --ctx-size",
            code="context_length_exceeded",
            param="messages",
        )
    if max_tokens is not None and len(prompt) + max_tokens > ctx:
        raise ApiError(
            400,
            f"this model's context holds {ctx} tokens, but {len(prompt) + max_tokens} were asked "
            f"({len(prompt)} in the prompt, {max_tokens} for the reply); lower max_tokens",
            code="context_length_exceeded",
            param="max_tokens",
        )


def encode_messages(held: Held, messages: Any, tools: list | None = None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI's content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(
                        400, f"messages[{i}]: only text content parts are supported", param="messages"
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or text parts", param="messages")
        clean.append({**m, "content": content})
    try:
        template = held.loaded.chat_template()
        return held.loaded.encode_chat(template, clean, **({"tools": tools} if tools else {}))
    except GarageError as e:
        raise ApiError(400, str(e), param="messages") from None


async def generate(
    held: Held, prompts: list[tuple[list[int], SamplingParams]], top_logprobs: int | None
) -> AsyncIterator:
    """Run one request per (prompt, params) side by side; yield (index, kind, payload) events.

    Closing the iterator (a client that went away) cancels whatever is still running.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    requests = []
    try:
        for i, (prompt, params) in enumerate(prompts):

            def emit(kind, payload, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))

            try:
                requests.append(held.scheduler.submit(Request(prompt, params, emit, top_logprobs)))
            except RuntimeError:  # unloaded between loading and now
                raise ApiError(
                    503, "the model was unloaded while this request started; send it again"
                ) from None
        open_ = len(requests)
        while open_:
            i, kind, payload = await queue.get()
            if kind in ("done", "error"):
                open_ -= 1
            yield i, kind, payload
    finally:
        for r in requests:
            r.cancel()


def json_format(held: Held, schema: dict | None, param: str) -> str:
    """The grammar for JSON output (matching `schema` when given); 400 when it cannot be used."""
    from garagelm.runtime.constrain import Constraint, json_grammar

    try:
        grammar = json_grammar(schema)
        Constraint.check(held.loaded.tokenizer, grammar)
    except GarageError as e:
        raise ApiError(400, str(e), param=param) from None
    return grammar
