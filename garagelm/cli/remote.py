"""`garage run MODEL --server URL`: the same chat, with the model held by a running server.

Speaks Ollama's /api/chat (and /api/generate for --raw), which `garage serve` and Ollama both
serve, streamed as NDJSON. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from garagelm.cli.run import ReplyWriter, print_stats, sampling_params
from garagelm.errors import GarageError
from garagelm.runtime.generate import Stats


class RemoteSession:
    def __init__(self, args: argparse.Namespace):
        from garagelm.cli.serve import server_url

        if args.template:
            raise GarageError("--template applies to a model loaded here; the server uses the model's own")
        if args.model.endswith(".gguf") or "/" in args.model:
            raise GarageError(
                f"{args.model}: with --server give a model name the server knows (see `garage list`)"
            )
        self.url = server_url(args.server).rstrip("/")
        self.key = args.api_key or os.environ.get("GARAGE_API_KEY")
        self.model, self.title = args.model, f"{args.model} at {self.url}"
        self.params = sampling_params(args)
        self.ctx_size = args.ctx_size
        self.verbose, self.raw, self.system = args.verbose, getattr(args, "raw", False), args.system
        self.messages: list[dict[str, str]] = []
        self.hide_thinking = getattr(args, "hide_thinking", False)

    def clear(self) -> None:
        self.messages.clear()

    def _options(self) -> dict:
        p = self.params
        opts = {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                "repeat_penalty": p.repeat_penalty, "seed": p.seed, "stop": p.stop or None,
                "num_predict": p.max_tokens, "num_ctx": self.ctx_size}  # fmt: skip
        return {k: v for k, v in opts.items() if v is not None}

    def _post(self, path: str, body: dict):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        try:
            return urllib.request.urlopen(req, timeout=600)
        except urllib.error.HTTPError as e:
            try:
                detail = json.load(e).get("error", e.reason)
            except ValueError:
                detail = e.reason
            raise GarageError(f"{self.url}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GarageError(
                f"no server at {self.url} ({getattr(e, 'reason', e)}); start one with `garage serve`"
            ) from None

    def reply(self, user_text: str, out=None) -> str:
        out = out or sys.stdout
        if self.raw:
            path, body = "/api/generate", {"model": self.model, "prompt": user_text, "raw": True}
        else:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
            path, body = (
                "/api/chat",
                {"model": self.model, "messages": [*messages, {"role": "user", "content": user_text}]},
            )
        t0 = time.perf_counter()
        last, interrupted = {}, False
        writer = ReplyWriter(out, hide=self.hide_thinking)
        try:
            with self._post(path, {**body, "stream": True, "options": self._options()}) as resp:
                for line in resp:
                    event = json.loads(line)
                    if "error" in event:
                        raise GarageError(f"{self.url}: {event['error']}")
                    message = event.get("message", {})
                    if message.get("thinking"):  # the server split the reasoning off already
                        writer.write("thinking", message["thinking"])
                    writer.write(
                        "answer", message.get("content", "") if not self.raw else event.get("response", "")
                    )
                    last = event
        except KeyboardInterrupt:  # closing the connection makes the server stop this reply
            interrupted = True
        text = writer.close()
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        if self.verbose and last.get("done"):
            s = Stats(prompt_tokens=last.get("prompt_eval_count", 0), prompt_seconds=last.get("prompt_eval_duration", 0) / 1e9,
                      generated_tokens=last.get("eval_count", 0), generate_seconds=last.get("eval_duration", 0) / 1e9)  # fmt: skip
            s.time_to_first_token = s.prompt_seconds
            print_stats(s, time.perf_counter() - t0, last.get("load_duration", 0) / 1e9)
        if interrupted:
            print("[reply stopped]", file=sys.stderr)
        return text
