"""`garage pull | list | show | rm`: the local model store."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections import Counter

from garagelm.errors import GarageError


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    if verb == "import":
        p.add_argument("path", help="a .gguf file")
        p.add_argument("--name", required=True, help="store name, e.g. mine:latest")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    if verb in ("pull", "show", "rm"):
        p.add_argument(
            "model",
            help="store name, e.g. smollm2:135m"
            + {"show": " or a .gguf path", "pull": ", a URL, or hf.co/USER/REPO/FILE.gguf"}.get(verb, ""),
        )
    if verb == "pull":
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument(
            "--name", default=None, help="store name for a pull by URL or hf.co/USER/REPO/FILE.gguf"
        )
    if verb == "show":
        p.add_argument("--template", action="store_true", help="print only the chat template")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _pull(args: argparse.Namespace) -> int:
    from garagelm.store.pull import is_direct, pull, pull_direct

    if getattr(args, "name", None) and not is_direct(args.model):
        raise GarageError(
            "--name is for pulls by URL or hf.co/USER/REPO/FILE.gguf; catalog models keep their name"
        )
    stored = (
        pull_direct(args.model, args.name, args.quiet)
        if is_direct(args.model)
        else pull(args.model, quiet=args.quiet)
    )
    print(
        f"{stored.name}: {stored.path} ({_size(stored.manifest['size'])}, sha256 {stored.manifest['sha256'][:12]}…)"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from garagelm.store.importer import import_file

    stored = import_file(args.path, args.name, quiet=args.quiet)
    print(f"{stored.name}: {stored.path} ({_size(stored.manifest['size'])}, {stored.manifest['architecture']}, "
          f"{stored.manifest['quantization']})")  # fmt: skip
    return 0


def _parameters(path) -> str:
    """Total weights in the file (its tensors' elements), read from the GGUF header only."""
    from garagelm.errors import GarageError
    from garagelm.formats.gguf import GGUFFile

    try:
        n = sum(t.n_elements for t in GGUFFile(path).tensors.values())
    except GarageError:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _list(args: argparse.Namespace) -> int:
    from garagelm.store.local import list_models

    models = list_models()
    if not models:
        print("No models yet: try `garage pull smollm2:135m`.")
        return 0
    rows = [("NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "MODIFIED")]
    for m in models:
        mf = m.manifest
        rows.append(
            (
                m.name,
                mf.get("architecture", "?"),
                _parameters(m.path),
                mf.get("quantization", "?"),
                _size(mf.get("size", 0)),
                mf.get("pulled_at", "")[:19],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    from garagelm.cli.resolve import resolve_model
    from garagelm.formats.gguf import GGUFFile

    path = resolve_model(args.model, pull_missing=False)
    if path.is_dir():
        return _show_hf(path, args)
    g = GGUFFile(path)
    template = g.get("tokenizer.chat_template")
    if args.template:
        if not template:
            raise GarageError(f"{args.model} has no chat template")
        print(template)
        return 0
    arch = g.architecture
    n_params = sum(t.n_elements for t in g.tensors.values())
    info = [
        ("file", str(path)),
        ("architecture", arch),
        ("name", g.get("general.name", "")),
        ("parameters", f"{n_params / 1e6:.1f}M"),
        ("context length", g.get(f"{arch}.context_length", "?")),
        ("embedding length", g.get(f"{arch}.embedding_length", "?")),
        ("layers", g.get(f"{arch}.block_count", "?")),
        ("license", g.get("general.license", "unknown")),
        (
            "tokenizer",
            f"{g.get('tokenizer.ggml.model')} ({g.get('tokenizer.ggml.pre', 'default')}), {len(g.get('tokenizer.ggml.tokens', []))} tokens",
        ),
        (
            "tensor types",
            ", ".join(f"{k} x{v}" for k, v in Counter(t.qtype for t in g.tensors.values()).most_common()),
        ),
    ]
    _print_info(info, template)
    return 0


def _show_hf(path, args: argparse.Namespace) -> int:
    """`show` for a Hugging Face folder: the same facts, read from config.json and the headers."""
    import json

    from safetensors import safe_open

    from garagelm.formats.safetensors import HFFolder
    from garagelm.models import HF_TYPES

    folder = HFFolder(path)
    cfg = folder.config.get("text_config", folder.config)
    tok_cfg = path / "tokenizer_config.json"
    template = json.loads(tok_cfg.read_text()).get("chat_template") if tok_cfg.is_file() else None
    if (path / "chat_template.jinja").is_file():  # where transformers 5 writes it
        template = (path / "chat_template.jinja").read_text()
    if args.template:
        if not template:
            raise GarageError(f"{args.model} has no chat template")
        print(template)
        return 0
    n_params, dtypes = 0, Counter()
    for shard in folder.shards:
        with safe_open(shard, framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n_params += math.prod(sl.get_shape())
                dtypes[sl.get_dtype()] += 1
    info = [
        ("folder", str(path)),
        (
            "architecture",
            f"{HF_TYPES.get(folder.config.get('model_type'), '?')} ({folder.config.get('model_type')})",
        ),
        ("parameters", f"{n_params / 1e6:.1f}M"),
        ("context length", cfg.get("max_position_embeddings", "?")),
        ("embedding length", cfg.get("hidden_size", "?")),
        ("layers", cfg.get("num_hidden_layers", "?")),
        ("tokenizer", "tokenizer.json" if (path / "tokenizer.json").is_file() else "none"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())),
    ]
    _print_info(info, template)
    return 0


def _print_info(info: list[tuple[str, object]], template: str | None) -> None:
    for k, v in info:
        print(f"  {k:18s}{v}")
    print("\n  chat template:" if template else "\n  chat template: none (use --raw or --template)")
    if template:
        print("    " + template.replace("\n", "\n    "))


def _rm(args: argparse.Namespace) -> int:
    from garagelm.store.local import model_dir

    if not model_dir(args.model).exists():  # a damaged entry can still be removed
        raise GarageError(f"model {args.model} is not in the store (see `garage list`)")
    shutil.rmtree(model_dir(args.model))
    print(f"deleted {args.model}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    return {"pull": _pull, "import": _import, "list": _list, "show": _show, "rm": _rm}[args.verb](args)
