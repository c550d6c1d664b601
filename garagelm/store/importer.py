"""`garage import PATH --name NAME`: put a local GGUF file into the store, checked and hashed."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from garagelm.errors import GarageError
from garagelm.formats.gguf import GGUFFile
from garagelm.store.download import CHUNK
from garagelm.store.local import (
    MANIFEST,
    StoredModel,
    find,
    model_dir,
    model_lock,
    parse_name,
    write_json_atomic,
)


def import_file(path: str | os.PathLike[str], name: str, quiet: bool = False) -> StoredModel:
    """Copy a GGUF file into the store as `name` (replacing a model of that name)."""
    src = Path(path).expanduser()
    family, tag = parse_name(name)
    name = f"{family}:{tag}"
    g = GGUFFile(src)  # a broken file fails here, before anything is written
    arch = g.architecture
    types = Counter(t.qtype for t in g.tensors.values() if len(t.shape) > 1)
    folder = model_dir(name)
    with model_lock(folder):
        old = find(name) if (folder / MANIFEST).exists() else None
        dest = folder / src.name
        partial = dest.with_name(dest.name + ".partial")
        digest = hashlib.sha256()
        from tqdm import tqdm

        try:
            with (
                open(src, "rb") as fin,
                open(partial, "wb") as fout,
                tqdm(
                    total=src.stat().st_size,
                    unit="B",
                    unit_scale=True,
                    desc=src.name,
                    disable=quiet,
                    leave=False,
                ) as bar,
            ):
                while block := fin.read(CHUNK):
                    digest.update(block)
                    fout.write(block)
                    bar.update(len(block))
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise GarageError(f"could not copy {src} into the store: {e}") from None
        (folder / MANIFEST).unlink(missing_ok=True)  # the old model stops being listed first
        os.replace(partial, dest)
        if old is not None and old.path != dest:
            old.path.unlink(missing_ok=True)
        write_json_atomic(
            folder / MANIFEST,
            {
                "name": name,
                "file": dest.name,
                "size": dest.stat().st_size,
                "sha256": digest.hexdigest(),
                "architecture": arch,
                "quantization": types.most_common(1)[0][0] if types else "?",
                "source": f"import:{src.resolve()}",
                "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    stored = find(name)
    assert stored is not None
    return stored
