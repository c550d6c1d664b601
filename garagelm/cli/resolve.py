"""MODEL arguments: a path to a file, or a store name (pulled on first use, as Ollama does)."""

from __future__ import annotations

import sys
from pathlib import Path

from garagelm.errors import GarageError


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or "/" in ref or ref.startswith(".") or Path(ref).exists()


def resolve_model(ref: str, pull_missing: bool = True) -> Path:
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise GarageError(f"{ref}: no such file")
        return path
    from garagelm.store.local import find, offline
    from garagelm.store.pull import catalog_entry, pull

    found = find(ref)
    if found is not None:
        return found.path
    if catalog_entry(ref) is None:
        raise GarageError(f"model {ref!r} not found: see `garage list`, or give a path to a .gguf file")
    if not pull_missing or offline():
        raise GarageError(f"model {ref} is not in the store; run `garage pull {ref}` (with network) first")
    print(f"pulling {ref} ...", file=sys.stderr)
    return pull(ref).path
