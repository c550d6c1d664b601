"""The local model store: GARAGE_HOME/models/<family>/<tag>/ with the file and a manifest."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garagelm.errors import GarageError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"


def garage_home() -> Path:
    if env := os.environ.get("GARAGE_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "garagelm"


def offline() -> bool:
    return os.environ.get("GARAGE_OFFLINE", "").lower() in ("1", "true", "yes")


def parse_name(name: str) -> tuple[str, str]:
    """'smollm2:135m' -> ('smollm2', '135m'); a missing tag is 'latest'. Rejects path tricks."""
    family, _, tag = name.strip().lower().partition(":")
    tag = tag or "latest"
    for part in (family, tag):
        if not _NAME_RE.match(part) or part in (".", ".."):
            raise GarageError(
                f"invalid model name {name!r}: use family:tag with letters, digits, '.', '_' or '-' "
                "(e.g. smollm2:135m), or a path to a .gguf file"
            )
    return family, tag


@dataclass
class StoredModel:
    name: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.folder / self.manifest["file"]


def model_dir(name: str) -> Path:
    family, tag = parse_name(name)
    return garage_home() / "models" / family / tag


def find(name: str) -> StoredModel | None:
    """The stored model called `name`, or None. Only complete pulls have a manifest."""
    folder = model_dir(name)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise GarageError(
            f"{mpath}: unreadable manifest ({e}); remove the model with `garage rm {name}`"
        ) from None
    file = manifest.get("file", "")
    if not isinstance(file, str) or "/" in file or file in ("", ".", ".."):
        raise GarageError(f"{mpath}: manifest names an invalid file {file!r}; pull the model again")
    model = StoredModel(name, folder, manifest)
    if not model.path.is_file():
        raise GarageError(f"{name}: the store lost {model.path}; run `garage pull {name}` again")
    size, actual = manifest.get("size"), model.path.stat().st_size
    if not isinstance(size, int) or isinstance(size, bool) or size != actual:
        raise GarageError(
            f"{mpath}: manifest gives size {size!r} but {model.path.name} has {actual} bytes; "
            f"the store was changed by hand or the pull was cut short: `garage rm {name}`, then pull again"
        )
    return model


def list_models() -> list[StoredModel]:
    root = garage_home() / "models"
    out = []
    for mpath in sorted(root.glob(f"*/*/{MANIFEST}")):
        name = f"{mpath.parent.parent.name}:{mpath.parent.name}"
        try:
            found = find(name)
        except GarageError as e:  # one damaged entry must not hide the others
            print(f"warning: skipping {name}: {e}", file=sys.stderr)
            continue
        if found:
            out.append(found)
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def model_lock(folder: Path):
    """One writer (pull or import) per model at a time; a second waits, then sees its result."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
