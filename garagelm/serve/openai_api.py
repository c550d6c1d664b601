"""OpenAI's shape: /v1/models, /v1/chat/completions, /v1/completions (SSE streaming or not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from typing import Any

from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from garagelm.errors import GarageError
from garagelm.runtime.sampling import SamplingParams
from garagelm.runtime.thinking import ThinkingSplitter, split_reply, starts_thinking
from garagelm.runtime.tools import check_tools, choose, parse_reply, prepare_messages, reply_schema
from garagelm.serve.common import (
    ApiError,
    Routes,
    check_context,
    encode_messages,
    field,
    generate,
    json_format,
    read_json,
    stop_list,
)

UNSUPPORTED = {  # asked for, not built yet: say so rather than ignore it
    "functions": "function calling is not supported yet",
}


def error_body(err: ApiError) -> dict:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    if err.status == 401:
        kind = "authentication_error"
    elif err.status == 404:
        kind = "not_found_error"
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def _params(data: dict, app_defaults: SamplingParams) -> tuple[SamplingParams, int, int | None]:
    """Sampling parameters, n and top_logprobs from an OpenAI request body."""
    max_tokens = field(data, "max_completion_tokens", int, lo=1)
    if max_tokens is None:
        max_tokens = field(data, "max_tokens", int, lo=1)
    bias = field(data, "logit_bias", dict, {})
    try:
        logit_bias = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise ApiError(400, "'logit_bias' maps token ids to numbers", param="logit_bias") from None
    if any(not -100 <= v <= 100 for v in logit_bias.values()):
        raise ApiError(400, "'logit_bias' values must be between -100 and 100", param="logit_bias")
    params = SamplingParams(
        temperature=field(data, "temperature", float, 1.0, lo=0.0, hi=2.0),
        top_p=field(data, "top_p", float, 1.0, lo=0.0, hi=1.0),
        top_k=0,  # OpenAI has no top-k or min-p: sample from the whole distribution
        min_p=0.0,
        seed=field(data, "seed", int, lo=-(2**63), hi=2**63 - 1),
        max_tokens=max_tokens,
        stop=stop_list(data.get("stop")),
        presence_penalty=field(data, "presence_penalty", float, 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=field(data, "frequency_penalty", float, 0.0, lo=-2.0, hi=2.0),
        logit_bias=logit_bias,
    )
    n = field(data, "n", int, 1, lo=1, hi=8)
    return params, n, max_tokens


def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


class OpenAIRoutes(Routes):
    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def models(self, request):
        from garagelm.store.local import list_models

        data = [
            {"id": m.name, "object": "model", "created": int(m.path.stat().st_mtime), "owned_by": "garagelm"}
            for m in list_models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request):
        return await self._complete(request, chat=True)

    async def completions(self, request):
        return await self._complete(request, chat=False)

    async def _complete(self, request, chat: bool):
        data = await read_json(request)
        for key, why in UNSUPPORTED.items():
            if data.get(key):
                raise ApiError(400, why, param=key)
        fmt = field(data, "response_format", dict, {"type": "text"})
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(
                400, "response_format.type must be text, json_object or json_schema", param="response_format"
            )
        schema = None
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(
                    400,
                    "response_format.json_schema must be an object with a 'schema'",
                    param="response_format",
                )
            schema = spec.get("schema", {})
        model = field(data, "model", str, required=True)
        params, n, max_tokens = _params(data, SamplingParams())
        stream = field(data, "stream", bool, False)
        include_usage = bool((field(data, "stream_options", dict, {}) or {}).get("include_usage"))
        if chat:
            top = field(data, "top_logprobs", int, lo=0, hi=20)
            want = field(data, "logprobs", bool, False)
            if top is not None and not want:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            top_logprobs = (top or 0) if want else None
        else:
            top_logprobs = field(data, "logprobs", int, lo=0, hi=20)
        held = await self.server.model(model, data.get("keep_alive"))
        tools = chat and bool(data.get("tools")) and data.get("tool_choice") != "none"
        if tools:
            if fmt["type"] != "text":
                raise ApiError(400, "use either tools or response_format, not both", param="response_format")
            try:
                functions, required = choose(check_tools(data["tools"]), data.get("tool_choice"))
            except GarageError as e:
                raise ApiError(400, str(e), param="tools") from None
            messages = data.get("messages")
            if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
                tool_role = "tool" in (held.loaded.template_source or "")
                messages = prepare_messages(messages, functions, required, tool_role)
            prompt = await asyncio.to_thread(encode_messages, held, messages)
            fmt, schema = {"type": "json_schema"}, reply_schema(functions, required)
        elif chat:
            prompt = await asyncio.to_thread(encode_messages, held, data.get("messages"))
        else:
            text = data.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str):
                raise ApiError(400, "'prompt' must be a string", param="prompt")
            prompt = held.loaded.tokenizer.encode(text, add_special=True)
        check_context(held, prompt, max_tokens)
        vocab = held.loaded.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ApiError(
                400, f"'logit_bias' token ids must be between 0 and {vocab - 1}", param="logit_bias"
            )
        if fmt["type"] != "text":
            grammar = await asyncio.to_thread(json_format, held, schema, "response_format")
            params = replace(params, grammar=grammar)
        job = generate(held, [(prompt, p) for p in _seeded(params, n)], top_logprobs)
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        shape = _Shape(chat, held.loaded.tokenizer, meta)
        shape.tools = tools
        if chat and not tools and fmt["type"] == "text":  # a reasoning model's <think> part apart
            shape.thinking = starts_thinking(held.loaded.tokenizer.decode(prompt[-8:], special=True))
        if stream:
            return StreamingResponse(
                shape.sse(job, len(prompt), n, include_usage), media_type="text/event-stream"
            )
        return JSONResponse(await shape.whole(job, len(prompt), n))


def _usage(n_prompt: int, generated: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": generated, "total_tokens": n_prompt + generated}


class _Shape:
    """Turns generation events into OpenAI's objects."""

    def __init__(self, chat: bool, tokenizer, meta: dict):
        self.chat, self.tok, self.meta = chat, tokenizer, meta
        self.tools = False  # replies are tool-call JSON (runtime/tools.py) to turn into tool_calls
        # not None: split <think> off into reasoning_content (True: the prompt opened it)
        self.thinking: bool | None = None

    def _split_delta(self, index: int, part: str, text: str, entries) -> dict:
        delta = {"reasoning_content": text} if part == "thinking" else {"content": text}
        return {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs(entries) if entries else None,
            "finish_reason": None,
        }

    def tool_message(self, text: str, finish: str) -> tuple[dict, str]:
        """(the assistant message, finish_reason) of a reply made in the tool-call format."""
        content, call = parse_reply(text)
        if call is None:
            return {"role": "assistant", "content": content}, finish
        calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": call}]
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": calls,
        }, "tool_calls" if finish == "stop" else finish

    def _token(self, tid: int) -> dict:
        raw = self.tok.token_bytes[tid]
        return {"token": raw.decode("utf-8", "replace"), "bytes": list(raw)}

    def logprobs(self, entries) -> Any:
        if self.chat:
            return {
                "content": [
                    {
                        **self._token(t),
                        "logprob": lp,
                        "top_logprobs": [{**self._token(a), "logprob": alp} for a, alp in alts],
                    }
                    for t, lp, alts in entries
                ]
            }
        return {
            "tokens": [self._token(t)["token"] for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self._token(a)["token"]: alp for a, alp in alts} for _, _, alts in entries],
        }

    def choice(
        self, index: int, text: str, finish: str | None, entries, want_logprobs: bool, delta: bool
    ) -> dict:
        out: dict[str, Any] = {"index": index}
        if self.chat:
            out["delta" if delta else "message"] = (
                {"role": "assistant", "content": text} if not delta else {"content": text}
            )
        else:
            out["text"] = text
        out["logprobs"] = self.logprobs(entries) if want_logprobs else None
        out["finish_reason"] = finish
        return out

    def _object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    async def whole(self, job, n_prompt: int, n: int) -> dict:
        async with contextlib.aclosing(job):  # an error (or n > 1 cut short) cancels the rest
            return await self._whole(job, n_prompt, n)

    async def _whole(self, job, n_prompt: int, n: int) -> dict:
        texts, entries, finish = [""] * n, [[] for _ in range(n)], [None] * n
        generated = 0
        want = False
        async for i, kind, payload in job:
            if kind == "text":
                texts[i] += payload[0]
                entries[i] += payload[1]
                want = want or bool(payload[1])
            elif kind == "done":
                finish[i] = payload.finish_reason or "stop"
                generated += payload.stats.generated_tokens
                want = want or payload.top_logprobs is not None
            else:
                raise ApiError(500, f"generation failed: {payload}")
        choices = [self.choice(i, texts[i], finish[i], entries[i], want, delta=False) for i in range(n)]
        if self.tools:
            for c in choices:
                c["message"], c["finish_reason"] = self.tool_message(
                    c["message"]["content"], c["finish_reason"]
                )
        elif self.thinking is not None:
            for c in choices:
                reasoning, c["message"]["content"] = split_reply(c["message"]["content"], self.thinking)
                if reasoning:
                    c["message"]["reasoning_content"] = reasoning
        return {
            **self.meta,
            "object": self._object(False),
            "choices": choices,
            "usage": _usage(n_prompt, generated),
        }

    async def sse(self, job, n_prompt: int, n: int, include_usage: bool):
        def event(choices: list, **extra) -> str:
            body = {**self.meta, "object": self._object(True), "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        generated = 0
        try:
            if self.chat:
                for i in range(n):
                    yield event(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            held_back = [""] * n  # tool-call replies are sent whole, once they parse
            splitters = (
                [ThinkingSplitter(self.thinking) for _ in range(n)] if self.thinking is not None else None
            )
            async for i, kind, payload in job:
                if kind == "text" and self.tools:
                    held_back[i] += payload[0]
                elif kind == "text" and splitters is not None:
                    parts = splitters[i].feed(payload[0]) or [("answer", "")] * bool(payload[1])
                    for n, (part, text) in enumerate(parts):  # the tokens' logprobs go out once
                        yield event([self._split_delta(i, part, text, payload[1] if n == 0 else [])])
                elif kind == "text":
                    piece, entries = payload
                    yield event([self.choice(i, piece, None, entries, bool(entries), delta=True)])
                elif kind == "done":
                    generated += payload.stats.generated_tokens
                    finish = payload.finish_reason or "stop"
                    if self.tools:
                        message, finish = self.tool_message(held_back[i], finish)
                        calls = message.get("tool_calls")
                        delta = (
                            {"tool_calls": [{"index": 0, **calls[0]}]}
                            if calls
                            else {"content": message["content"]}
                        )
                        yield event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    for part, text in splitters[i].flush() if splitters is not None else []:
                        yield event([self._split_delta(i, part, text, [])])
                    last = self.choice(i, "", finish, [], False, delta=True)
                    if self.chat:
                        last["delta"] = {}
                    yield event([last])
                else:
                    err = {
                        "error": {
                            "message": f"generation failed: {payload}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                    return
            if include_usage:
                yield event([], usage=_usage(n_prompt, generated))
            yield "data: [DONE]\n\n"
        finally:
            await job.aclose()  # a client that went away cancels its generations
