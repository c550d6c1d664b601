"""`garage run MODEL [PROMPT]` and `garage chat MODEL`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from garagelm.errors import GarageError


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--max-tokens", type=int, default=None, help="default: until the model stops or the context is full"
    )
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable); never printed")
    g.add_argument(
        "--ctx-size", type=int, default=None, help="context length (default: the model's, at most 4096)"
    )
    add_kv_cache_argument(g)


def add_kv_cache_argument(p) -> None:
    """--kv-cache, as llama.cpp's -ctk/-ctv and Ollama's OLLAMA_KV_CACHE_TYPE."""
    p.add_argument("--kv-cache", choices=["f16", "q8_0"], default=None,
                   help="keys/values as f16 (default) or q8_0: half the memory and faster decode at "
                        "long contexts, logits within a few hundredths")  # fmt: skip


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="store name (smollm2:135m) or path to a .gguf file")
    if verb == "run":
        p.add_argument("prompt", nargs="*", help="prompt; without one, stdin if piped, else interactive chat")
        p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument(
        "--template", default=None, help="chat template (Jinja) file or text, replacing the model's"
    )
    p.add_argument("--verbose", action="store_true", help="print timings after each reply")
    p.add_argument(
        "--hide-thinking", action="store_true", help="do not show a reasoning model's <think> part"
    )
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat through a running `garage serve` (or Ollama) at URL instead of loading the model here")  # fmt: skip
    p.add_argument("--api-key", default=None, help="the server's key (default $GARAGE_API_KEY)")
    add_sampling_arguments(p)


def sampling_params(args: argparse.Namespace):
    from garagelm.runtime.sampling import SamplingParams

    for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
        if getattr(args, name) < 0:
            raise GarageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise GarageError("--max-tokens must be at least 1")
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
    )


def _template_source(arg: str | None) -> str | None:
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in arg:
        raise GarageError(f"--template {arg!r}: no such file, and not a Jinja template")
    return arg


class Session:
    """A loaded model plus the engine and the conversation so far."""

    def __init__(self, args: argparse.Namespace):
        from garagelm.cli.resolve import resolve_model
        from garagelm.runtime.generate import Engine
        from garagelm.runtime.load import load_model

        t0 = time.perf_counter()
        self.loaded = load_model(resolve_model(args.model))
        ctx = args.ctx_size or min(self.loaded.context_length, 4096)
        if ctx < 16:
            raise GarageError(f"--ctx-size {ctx} is too small (at least 16)")
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer, ctx, kv_dtype=args.kv_cache)
        self.load_seconds = time.perf_counter() - t0
        self.params = sampling_params(args)
        self.verbose = args.verbose
        self.raw = getattr(args, "raw", False)
        self.system = args.system
        self.template_override = _template_source(args.template)
        self.template = None if self.raw else self.loaded.chat_template(self.template_override)
        self.messages: list[dict[str, str]] = []
        self.title = self.loaded.path.name
        self.hide_thinking = getattr(args, "hide_thinking", False)

    def clear(self) -> None:
        self.messages.clear()
        self.engine.reset()

    def prompt_ids(self, user_text: str) -> list[int]:
        tok = self.loaded.tokenizer
        if self.raw:
            return tok.encode(user_text, add_special=True, parse_special=False)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        messages = [*messages, {"role": "user", "content": user_text}]
        return self.loaded.encode_chat(self.template, messages)

    def reply(self, user_text: str, out=None) -> str:
        """Stream the model's reply to `out`; Ctrl-C stops the reply, keeping what was said."""
        from garagelm.runtime.generate import Completion
        from garagelm.runtime.thinking import starts_thinking

        out = out or sys.stdout
        ids = self.prompt_ids(user_text)
        completion = Completion()
        t0 = time.perf_counter()
        interrupted = False
        tok = self.loaded.tokenizer
        writer = ReplyWriter(out, starts_thinking(tok.decode(ids[-8:], special=True)), self.hide_thinking)
        try:
            for piece in self.engine.complete(ids, self.params, completion):
                writer.write("answer", piece)
        except KeyboardInterrupt:
            interrupted = True
        answer = writer.close()
        # the thinking is not sent back in later turns, as reasoning models expect
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        if self.verbose:
            print_stats(completion.stats, time.perf_counter() - t0, self.load_seconds)
            self.load_seconds = 0.0
        if interrupted:
            print("[reply stopped]", file=sys.stderr)
        return answer


class ReplyWriter:
    """Writes a streamed reply. A reasoning model's <think> part is shown apart, as Ollama does
    ("Thinking..." ... "...done thinking."), dimmed on a terminal, or hidden (--hide-thinking)."""

    def __init__(self, out, inside: bool = False, hide: bool = False):
        from garagelm.runtime.thinking import ThinkingSplitter

        self.out, self.hide = out, hide
        self.split = ThinkingSplitter(inside)
        self.tty = getattr(out, "isatty", lambda: False)()
        self.answer, self.thinking, self._state = "", False, "none"

    def write(self, kind: str, piece: str) -> None:
        """kind "answer" is raw model text (split here); "thinking" is thinking already split."""
        parts = self.split.feed(piece) if kind == "answer" else [("thinking", piece)]
        for k, text in parts:
            self._put(k, text)
        self.out.flush()

    def _put(self, kind: str, text: str) -> None:
        if kind == "thinking":
            self.thinking = True
            if self.hide:
                return
            if self._state != "thinking":
                self.out.write(("\x1b[2m" if self.tty else "") + "Thinking...\n")
                self._state = "thinking"
            self.out.write(text)
            return
        if self._state == "thinking":
            self.out.write("\n...done thinking.\n\n" + ("\x1b[0m" if self.tty else ""))
        self._state = "answer"
        self.answer += text
        self.out.write(text)

    def close(self) -> str:
        for k, text in self.split.flush():
            self._put(k, text)
        if self._state == "thinking":  # stopped while thinking
            self.out.write("\x1b[0m" if self.tty else "")
        if not self.answer.endswith("\n"):
            self.out.write("\n")
        self.out.flush()
        return self.answer


def print_stats(s, total: float, load: float) -> None:
    """The block `ollama run --verbose` prints, plus time to first token and the kernel variant."""
    from garagelm.quant import cpu

    lines = [
        ("total duration", f"{total + load:.3f}s"),
        ("load duration", f"{load:.3f}s"),
        ("prompt eval count", f"{s.prompt_tokens} token(s) ({s.cached_tokens} cached)"),
        ("prompt eval duration", f"{s.prompt_seconds:.3f}s"),
        ("prompt eval rate", f"{s.prompt_tps:.2f} tokens/s"),
        ("time to first token", f"{s.time_to_first_token:.3f}s"),
        ("eval count", f"{s.generated_tokens} token(s)"),
        ("eval duration", f"{s.generate_seconds:.3f}s"),
        ("eval rate", f"{s.generate_tps:.2f} tokens/s"),
        ("kernels", cpu.variant_name()),
    ]
    for k, v in lines:
        print(f"{k + ':':22s}{v}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    prompt = " ".join(getattr(args, "prompt", []) or [])
    interactive = args.verb == "chat"
    if not interactive and not prompt:
        if sys.stdin.isatty():
            interactive = True
        else:
            prompt = sys.stdin.read()
            if not prompt.strip():
                raise GarageError("stdin was empty; give a prompt")
    if args.server:
        from garagelm.cli.remote import RemoteSession

        session = RemoteSession(args)
    else:
        session = Session(args)
    if interactive:
        from garagelm.cli.chat import repl

        return repl(session)
    session.reply(prompt)
    return 0
