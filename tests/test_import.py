"""`garage import`, then list / run / show / rm by name."""

from __future__ import annotations

import pytest

from garagelm.cli import main
from garagelm.errors import GarageError
from garagelm.store import local
from garagelm.store.importer import import_file


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GARAGE_OFFLINE", "1")
    return tmp_path


def test_import_list_run_rm(home, smol_path, capsys):
    assert main(["import", str(smol_path), "--name", "mine:latest", "--quiet"]) == 0
    stored = local.find("mine:latest")
    assert stored.manifest["architecture"] == "llama" and stored.manifest["quantization"] == "Q4_1"
    assert stored.path.read_bytes() == smol_path.read_bytes()
    main(["list"])
    listing = capsys.readouterr().out
    assert "mine:latest" in listing and "135M" in listing and "PARAMS" in listing
    assert (
        main(["run", "mine", "Say hi.", "--temperature", "0", "--max-tokens", "4"]) == 0
    )  # tag defaults to latest
    assert capsys.readouterr().out.strip()
    assert main(["show", "mine:latest"]) == 0 and "llama" in capsys.readouterr().out
    assert main(["rm", "mine:latest"]) == 0
    assert local.find("mine:latest") is None


def test_import_again_replaces(home, smol_path):
    first = import_file(smol_path, "mine:a", quiet=True)
    second = import_file(smol_path, "mine:a", quiet=True)
    assert first.path == second.path and [m.name for m in local.list_models()] == ["mine:a"]


def test_broken_file_leaves_store_untouched(home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GarageError, match="not a GGUF file"):
        import_file(bad, "bad:1", quiet=True)
    assert local.list_models() == [] and not local.model_dir("bad:1").exists()


def test_hostile_name(home, smol_path):
    with pytest.raises(GarageError, match="invalid model name"):
        import_file(smol_path, "../../x:y", quiet=True)


@pytest.mark.parametrize("size", [-5, 10**30, "big", None])
def test_tampered_manifest_size(home, smol_path, capsys, size):
    import json

    stored = import_file(smol_path, "mine:x", quiet=True)
    mpath = stored.folder / local.MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["size"] = size
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(GarageError, match=r"manifest gives size .* `garage rm mine:x`"):
        local.find("mine:x")
    assert main(["list"]) == 0
    out = capsys.readouterr()
    assert "mine:x" not in out.out and "skipping mine:x" in out.err
    assert main(["rm", "mine:x"]) == 0 and not stored.folder.exists()
