"""Ollama's shape: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time

from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from garagelm import __version__
from garagelm.errors import GarageError
from garagelm.runtime.sampling import SamplingParams
from garagelm.runtime.thinking import ThinkingSplitter, starts_thinking
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


def keep_alive_seconds(value) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a duration such as "5m", "1h30m", "-1"."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if re.fullmatch(r"-?\d+(\.\d+)?", value.strip()):
            return float(value)
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
        if parts and "".join(a + b for a, b in parts) == value.strip().lstrip("-"):
            total = sum(float(a) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[b] for a, b in parts)
            return -total if value.strip().startswith("-") else total
    raise ApiError(
        400, f'keep_alive {value!r} is not a duration (e.g. 300, "5m", "1h", -1)', param="keep_alive"
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _details(manifest: dict, params: str = "") -> dict:
    arch = manifest.get("architecture", "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": params,
        "quantization_level": manifest.get("quantization", ""),
    }


def _options(data: dict) -> SamplingParams:
    opts = field(data, "options", dict, {}) or {}
    p = SamplingParams()  # Ollama's defaults are llama.cpp's
    return SamplingParams(
        temperature=field(opts, "temperature", float, p.temperature, lo=0.0),
        top_k=field(opts, "top_k", int, p.top_k, lo=0),
        top_p=field(opts, "top_p", float, p.top_p, lo=0.0, hi=1.0),
        min_p=field(opts, "min_p", float, p.min_p, lo=0.0, hi=1.0),
        repeat_penalty=field(opts, "repeat_penalty", float, p.repeat_penalty, lo=0.0),
        repeat_last_n=field(opts, "repeat_last_n", int, p.repeat_last_n, lo=0),
        presence_penalty=field(opts, "presence_penalty", float, 0.0),
        frequency_penalty=field(opts, "frequency_penalty", float, 0.0),
        seed=field(opts, "seed", int, lo=-(2**63), hi=2**63 - 1),
        max_tokens=_num_predict(opts),
        stop=stop_list(opts.get("stop")),
    )


def _num_predict(opts: dict) -> int | None:
    n = field(opts, "num_predict", int)
    return None if n is None or n < 0 else max(n, 1)


class OllamaRoutes(Routes):
    def routes(self) -> list[Route]:
        return [
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
        ]

    async def pull(self, request):
        """Pull from the catalog into the store; progress as NDJSON status lines, as Ollama.
        Only catalog names: a pull by URL is for the command line, not for whoever can reach
        the API."""
        from garagelm.store.progress import listening
        from garagelm.store.pull import is_direct, pull

        data = await read_json(request)
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing required field 'model'", param="model")
        if is_direct(name):
            raise ApiError(
                400, "the API pulls catalog models only; pull a URL with `garage pull URL`", param="model"
            )
        stream = field(data, "stream", bool, True)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(status, completed, total):
            event = {"status": status} | ({"completed": completed} if completed is not None else {})
            loop.call_soon_threadsafe(queue.put_nowait, event | ({"total": total} if total else {}))

        def work():
            with listening(listener):
                pull(name, quiet=True)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        if not stream:
            try:
                await task
            except GarageError as e:
                raise ApiError(400, str(e)) from None
            return JSONResponse({"status": "success"})

        async def lines():
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield json.dumps(getter.result()) + "\n"
                else:
                    getter.cancel()
            err = task.exception()
            yield json.dumps({"error": str(err)} if err else {"status": "success"}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def version(self, request):
        return JSONResponse({"version": __version__})

    async def tags(self, request):
        from garagelm.store.local import list_models

        models = []
        for m in list_models():
            models.append({
                "name": m.name, "model": m.name, "modified_at": _iso(m.path.stat().st_mtime),
                "size": m.manifest.get("size", 0), "digest": m.manifest.get("sha256", ""),
                "details": _details(m.manifest),
            })  # fmt: skip
        return JSONResponse({"models": models})

    async def ps(self, request):
        return JSONResponse({"models": self.server.ps()})

    async def show(self, request):
        from garagelm.store.local import find

        data = await read_json(request)
        name = data.get("model") or data.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "missing required field 'model'", param="model")
        try:
            stored = await asyncio.to_thread(find, self.server.pool.canonical(name))
        except GarageError as e:
            raise ApiError(400, str(e), param="model") from None
        if stored is None:
            raise ApiError(404, f"model '{name}' not found")
        from garagelm.formats.gguf import GGUFFile

        g = await asyncio.to_thread(GGUFFile, stored.path)
        info = {
            k: v
            for k, v in g.metadata.items()
            if not k.startswith("tokenizer.ggml.") and isinstance(v, (str, int, float, bool))
        }
        return JSONResponse({
            "license": str(g.get("general.license", "")), "modelfile": "", "parameters": "",
            "template": str(g.get("tokenizer.chat_template", "")), "details": _details(stored.manifest),
            "model_info": info, "modified_at": _iso(stored.path.stat().st_mtime),
        })  # fmt: skip

    async def chat(self, request):
        data = await read_json(request)
        return await self._run(data, chat=True)

    async def generate(self, request):
        data = await read_json(request)
        return await self._run(data, chat=False)

    async def _run(self, data: dict, chat: bool):
        model = field(data, "model", str, required=True)
        keep_alive = keep_alive_seconds(data.get("keep_alive"))
        stream = field(data, "stream", bool, True)
        params = _options(data)
        empty = not data.get("messages") if chat else not data.get("prompt")
        if empty:  # Ollama's way to load (or with keep_alive 0, unload) a model
            if keep_alive == 0:
                await asyncio.to_thread(self.server.pool.unload, model)
            else:
                await self.server.model(model, keep_alive)
            body = {
                "model": model,
                "created_at": _iso(time.time()),
                "done": True,
                "done_reason": "unload" if keep_alive == 0 else "load",
            }
            body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            return JSONResponse(body)
        t0 = time.perf_counter()
        held = await self.server.model(model, keep_alive)
        load_ns = int((time.perf_counter() - t0) * 1e9)
        if chat:
            prompt = await asyncio.to_thread(encode_messages, held, data.get("messages"))
        else:
            text = field(data, "prompt", str, "")
            if data.get("raw"):
                prompt = held.loaded.tokenizer.encode(text, add_special=True)
            else:
                system = field(data, "system", str)
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": text}
                ]
                if held.loaded.template_source:
                    prompt = await asyncio.to_thread(encode_messages, held, messages)
                else:  # a base model: the prompt as it is
                    prompt = held.loaded.tokenizer.encode(text, add_special=True)
        check_context(held, prompt, None)
        fmt = data.get("format")
        if fmt not in (None, ""):  # "json", or a JSON schema
            if fmt != "json" and not isinstance(fmt, dict):
                raise ApiError(400, "'format' must be \"json\" or a JSON schema object", param="format")
            schema = fmt if isinstance(fmt, dict) else None
            params.grammar = await asyncio.to_thread(json_format, held, schema, "format")
        job = generate(held, [(prompt, params)], None)

        def line(piece: str, thinking: str = "", **extra) -> str:
            body = {"model": model, "created_at": _iso(time.time())}
            message = {"role": "assistant", "content": piece} | ({"thinking": thinking} if thinking else {})
            body.update({"message": message} if chat else {"response": piece})
            return json.dumps({**body, "done": False, **extra}) + "\n"

        # a reasoning model's <think> part goes in message.thinking, as Ollama returns it
        split = ThinkingSplitter(starts_thinking(held.loaded.tokenizer.decode(prompt[-8:], special=True)))
        split = split if chat and params.grammar is None else None

        def pieces(text: str, last: bool = False) -> list[tuple[str, str]]:
            if split is None:
                return [("answer", text)] if text else []
            return split.feed(text) + (split.flush() if last else [])

        def final(completion) -> dict:
            s = completion.stats
            return {
                "done": True, "done_reason": completion.finish_reason or "stop",
                "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": load_ns,
                "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": int(s.prompt_seconds * 1e9),
                "eval_count": s.generated_tokens, "eval_duration": int(s.generate_seconds * 1e9),
            }  # fmt: skip

        if not stream:
            text = ""
            async for _, kind, payload in job:
                if kind == "text":
                    text += payload[0]
                elif kind == "done":
                    parts = pieces(text, last=True)
                    answer = "".join(t for k, t in parts if k == "answer")
                    thinking = "".join(t for k, t in parts if k == "thinking").rstrip("\n")
                    return JSONResponse(json.loads(line(answer, thinking)) | final(payload))
                else:
                    raise ApiError(500, f"generation failed: {payload}")

        async def lines():
            try:
                async for _, kind, payload in job:
                    if kind == "text" or kind == "done":
                        last = kind == "done"
                        for part, text in pieces(payload[0] if not last else "", last):
                            yield line(text) if part == "answer" else line("", text)
                        if last:
                            yield json.dumps(json.loads(line("")) | final(payload)) + "\n"
                    else:
                        yield json.dumps({"error": f"generation failed: {payload}"}) + "\n"
            finally:
                await job.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")
