"""`garage` command: parse arguments, then import and run only the verb asked for."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from garagelm import __version__

# verb -> module under garagelm.cli providing add_arguments(parser) and main(args).
VERBS = {
    "run": ("run", "Run a model: one prompt, piped stdin, or an interactive chat"),
    "chat": ("run", "Interactive chat with a model"),
    "pull": ("store", "Download a model from the catalog into the local store"),
    "import": ("store", "Copy a local .gguf file into the store under a name"),
    "list": ("store", "List models in the local store"),
    "show": ("store", "Show a model's metadata, chat template and tensors"),
    "rm": ("store", "Remove a model from the local store"),
    "search": ("search", "Search the catalog and see which models fit this computer"),
    "serve": ("serve", "Serve models over an OpenAI- and Ollama-compatible API, with a chat page"),
    "ps": ("serve", "Show the models a running server holds in memory"),
    "quantize": ("quantize", "Quantize a model: GGUF types (Q8_0 ... Q4_K_M ... Q4_0) or FP8"),
    "convert": ("quantize", "Convert a GGUF model's weights to F16, BF16 or F32"),
    "eval": ("eval", "Measure quality: perplexity, or a trade-off table of quantized models vs their source"),
    "bench": ("bench", "Measure prompt processing and generation speed on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="garage", description="Powerful AI without a data centre.")
    parser.add_argument("--version", action="version", version=f"garagelm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        importlib.import_module(f"garagelm.cli.{module}").add_arguments(verb, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # A prompt written after flags (`run MODEL --raw TEXT`) arrives as leftovers.
    if extra and getattr(args, "prompt", None) is not None and not any(e.startswith("-") for e in extra):
        args.prompt = [*args.prompt, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verb:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("GARAGE_DEBUG") == "1"
    module = importlib.import_module(f"garagelm.cli.{VERBS[args.verb][0]}")
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        from garagelm.errors import GarageError

        if debug:
            raise
        if isinstance(e, GarageError):
            print(f"error: {e}", file=sys.stderr)
        else:
            print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
