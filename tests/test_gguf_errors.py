"""Broken GGUF files give one line naming the file and the problem: no traceback, no crash; and
the reader gives memory back once a tensor has been repacked."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from garagelm.formats.gguf import GGUFError, GGUFFile


def _garage(*args, env=None):
    return subprocess.run([sys.executable, "-m", "garagelm", *args], capture_output=True, text=True, env=env)


def _tensor_info_offset(path):
    """Byte offset of the first tensor's type field (header parsed by gguf-py, the reference)."""
    from gguf import GGUFReader

    t = GGUFReader(path).tensors[0]
    # Tensor info layout: name (u64 len + bytes), n_dims u32, dims u64*n, type u32, offset u64.
    raw = path.read_bytes()
    key = struct.pack("<Q", len(t.name)) + t.name.encode()
    start = raw.index(key, 0)
    name_field_end = start + len(key)
    return name_field_end + 4 + 8 * len(t.shape)


def _expect_one_line_error(path, must_contain):
    proc = _garage("run", str(path), "hi", "--max-tokens", "1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in lines[0] and must_contain in lines[0], lines[0]


def test_bad_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    _expect_one_line_error(p, "not a GGUF file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _expect_one_line_error(p, "not a GGUF file")


def test_truncated_header(smol_path, tmp_path):
    p = tmp_path / "trunc-header.gguf"
    p.write_bytes(smol_path.read_bytes()[:50_000])  # inside the vocabulary
    _expect_one_line_error(p, "truncated GGUF header")


@pytest.mark.parametrize("count", [10**9, 2**63 + 5])
def test_corrupt_string_count(smol_path, tmp_path, count):
    """A vocabulary whose count is past what the file could hold: the truncation error, not a
    huge allocation (the strings are read in C) nor an overflow."""
    data = bytearray(smol_path.read_bytes()[:2_000_000])
    key = b"tokenizer.ggml.tokens"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<II", data, at) == (9, 8)  # an array of strings
    struct.pack_into("<Q", data, at + 8, count)
    p = tmp_path / "bad-count.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated GGUF header"):
        GGUFFile(p)


def test_truncated_tensor_data(smol_path, tmp_path):
    p = tmp_path / "trunc-data.gguf"
    data = smol_path.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    _expect_one_line_error(p, "runs past the end of the file")


def test_unknown_tensor_type(smol_path, tmp_path):
    data = bytearray(smol_path.read_bytes())
    off = _tensor_info_offset(smol_path)
    data[off : off + 4] = struct.pack("<I", 9999)
    p = tmp_path / "badtype.gguf"
    p.write_bytes(bytes(data))
    _expect_one_line_error(p, "unknown GGML type id 9999")


def test_unsupported_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 9) + b"\0" * 64)
    _expect_one_line_error(p, "GGUF version 9")


def test_huge_counts_rejected(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60))
    _expect_one_line_error(p, "corrupt")


def test_missing_file_and_folder(tmp_path):
    _expect_one_line_error(tmp_path / "nope.gguf", "no such file")


def test_reader_matches_gguf_py(smol_path):
    """Our fast header parser returns what gguf-py's reader returns."""
    from gguf import GGUFReader

    ours, ref = GGUFFile(smol_path), GGUFReader(smol_path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        want = field.contents()
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ours.tensors[t.name].raw)


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_released_tensors_leave_memory_but_keep_their_bytes(smol_path):
    """After a tensor is repacked, release() unmaps its pages (RSS drops by its size) while a
    later read maps the same bytes back from the page cache."""
    import hashlib

    g = GGUFFile(smol_path)
    t = g.tensors["token_embd.weight"]  # 28 MB
    digest = hashlib.sha256(t.raw.tobytes()).hexdigest()  # reads every page
    before = _mapped_kib(g.path.resolve())
    g.release(t)
    after = _mapped_kib(g.path.resolve())
    assert before - after >= t.n_bytes // 1024 - 8, (before, after)
    assert hashlib.sha256(t.raw.tobytes()).hexdigest() == digest


def test_type_ids_are_ggmls():
    """Our GGML type id table (so reading a file need not import gguf) against gguf-py's enum."""
    import gguf

    from garagelm.formats.ggml_quants import BLOCK_LAYOUT, GGML_TYPE_NAMES

    theirs = {t.value: t.name for t in gguf.GGMLQuantizationType}
    assert all(theirs[i] == name for i, name in GGML_TYPE_NAMES.items())
    assert set(BLOCK_LAYOUT) <= set(GGML_TYPE_NAMES.values())  # every type we read has its id
