"""HTTP pulls against a real server on 127.0.0.1: resume, corruption, lies, offline."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from garagelm.errors import GarageError
from garagelm.store import local
from garagelm.store.download import download
from garagelm.store.pull import pull

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every byte value
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server(http.server.ThreadingHTTPServer):
    """Serves PAYLOAD at /model.gguf with Range support; knobs to misbehave."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.cut_after: int | None = None  # close the connection after this many bytes (once)
        self.claim_length: int | None = None  # Content-Length to announce instead of the truth
        self.body = PAYLOAD
        self.ranges: list[str | None] = []


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        srv: Server = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(srv.body):
            self.send_response(416)
            self.end_headers()
            return
        data = srv.body[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.body) - 1}/{len(srv.body)}")
        self.send_header("Content-Length", str(srv.claim_length or len(data)))
        self.end_headers()
        if srv.cut_after is not None:
            data, srv.cut_after = data[: srv.cut_after], None
        self.wfile.write(data)


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GARAGE_OFFLINE", raising=False)
    yield srv
    srv.shutdown()


def url(srv):
    return f"http://127.0.0.1:{srv.server_port}/model.gguf"


def test_download_verifies_and_renames(server, tmp_path):
    out = download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "m.gguf.partial").exists()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.cut_after = 300_000
    with pytest.raises(GarageError, match="pull again to resume"):
        download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert (tmp_path / "m.gguf.partial").stat().st_size == 300_000
    assert not (tmp_path / "m.gguf").exists()
    download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert server.ranges[-1] == "bytes=300000-"
    assert (tmp_path / "m.gguf").read_bytes() == PAYLOAD


def test_corrupt_bytes_fail_the_checksum(server, tmp_path):
    server.body = PAYLOAD[:-1] + b"\x00"
    with pytest.raises(GarageError, match="checksum mismatch"):
        download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert not list(tmp_path.glob("m.gguf*"))


def test_server_lying_about_length(server, tmp_path):
    server.claim_length = len(PAYLOAD) * 2
    with pytest.raises(GarageError, match="server announces"):
        download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert not (tmp_path / "m.gguf").exists()


def test_offline_and_negative_size(server, tmp_path, monkeypatch):
    with pytest.raises(GarageError, match="negative size"):
        download(url(server), tmp_path / "m.gguf", SHA, -5, quiet=True)
    monkeypatch.setenv("GARAGE_OFFLINE", "1")
    with pytest.raises(GarageError, match="GARAGE_OFFLINE=1"):
        download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert server.ranges == []  # nothing was requested


def _catalog(tmp_path, monkeypatch, srv, **entry):
    data = {
        "file": "model.gguf", "size": len(PAYLOAD), "sha256": SHA, "architecture": "llama",
        "quantization": "Q4_0", "sources": [{"type": "url", "url": url(srv)}],
    }  # fmt: skip
    data.update(entry)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"tiny:test": data}))
    monkeypatch.setenv("GARAGE_CATALOG", str(path))


def test_pull_from_a_url_catalog_entry(server, tmp_path, monkeypatch):
    _catalog(tmp_path, monkeypatch, server)
    server.cut_after = 1000
    with pytest.raises(GarageError, match="could not pull tiny:test"):
        pull("tiny:test", quiet=True)
    assert local.list_models() == []  # a half download is never listed
    stored = pull("tiny:test", quiet=True)
    assert stored.path.read_bytes() == PAYLOAD and stored.manifest["source"] == url(server)
    assert [m.name for m in local.list_models()] == ["tiny:test"]


def test_catalog_file_with_path_tricks_is_refused(server, tmp_path, monkeypatch):
    _catalog(tmp_path, monkeypatch, server, file="../../evil.gguf")
    with pytest.raises(GarageError, match="unsafe file"):
        pull("tiny:test", quiet=True)


_FILL_DISK = """
import resource, signal, sys
from garagelm.errors import GarageError
from garagelm.store.download import download
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
try:
    download(sys.argv[1], __import__("pathlib").Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), quiet=True)
except GarageError as e:
    print(e)
    sys.exit(3)
"""


def test_disk_filling_up_keeps_the_partial_and_resumes(server, tmp_path):
    import subprocess
    import sys

    dest = tmp_path / "m.gguf"
    args = [sys.executable, "-c", _FILL_DISK, url(server), str(dest), SHA, str(len(PAYLOAD))]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "disk full" in r.stdout and "pull again" in r.stdout
    assert not dest.exists()  # nothing half-written under the real name
    kept = (tmp_path / "m.gguf.partial").stat().st_size
    assert 0 < kept <= 300_000
    download(url(server), dest, SHA, len(PAYLOAD), quiet=True)  # space again: resumes
    assert dest.read_bytes() == PAYLOAD and server.ranges[-1] == f"bytes={kept}-"


def test_not_enough_free_space_is_refused_before_downloading(server, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(GarageError, match=r"not enough disk space .* GiB free"):
        download(url(server), tmp_path / "m.gguf", SHA, len(PAYLOAD), quiet=True)
    assert server.ranges == [] and not list(tmp_path.iterdir())


def test_pull_by_url_and_hugging_face_path(smol_path, tmp_path, monkeypatch, capsys):
    from conftest import serve_dir

    """`garage pull URL --name` and `garage pull hf.co/USER/REPO/FILE.gguf` outside the catalog."""
    import shutil

    from garagelm.cli import main

    root = tmp_path / "www"
    hf_dir = root / "someone" / "smol-gguf" / "resolve" / "main"
    hf_dir.mkdir(parents=True)
    shutil.copy(smol_path, hf_dir / smol_path.name)
    (root / "not-a-model.gguf").write_bytes(PAYLOAD)

    srv = serve_dir(root)
    base = f"http://127.0.0.1:{srv.server_port}"
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GARAGE_HF_ENDPOINT", base)
    monkeypatch.delenv("GARAGE_OFFLINE", raising=False)
    try:
        url = f"{base}/someone/smol-gguf/resolve/main/{smol_path.name}"
        assert main(["pull", url, "--name", "mine:web", "--quiet"]) == 0
        web = local.find("mine:web")
        assert web.manifest["sha256"] == hashlib.sha256(smol_path.read_bytes()).hexdigest()
        assert web.manifest["architecture"] == "llama" and web.manifest["source"] == url
        assert main(["pull", f"hf.co/someone/smol-gguf/{smol_path.name}", "--quiet"]) == 0
        hf = local.find("smollm2-135m-instruct.q4_1:latest")
        assert hf.manifest["source"] == f"hf:someone/smol-gguf/{smol_path.name}"
        assert main(["pull", f"{base}/not-a-model.gguf", "--quiet"]) == 1
        assert "not a usable GGUF file" in capsys.readouterr().err
        assert local.find("not-a-model:latest") is None
        assert not list((tmp_path / "home" / "models" / "not-a-model" / "latest").glob("*.gguf"))
    finally:
        srv.shutdown()
