"""Read GGUF files: memory-mapped tensors, metadata as Python values, clear errors.

The header is parsed here rather than with gguf-py's GGUFReader because that reader turns every
vocabulary string into a numpy object and takes seconds on a 50k-token vocabulary; start-up
must take well under one. gguf-py stays the source of the format's constants, the writer, and
the reference our tests compare this reader against.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from garagelm.errors import GarageError
from garagelm.formats.ggml_quants import BLOCK_LAYOUT, GGML_TYPE_NAMES, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+

# GGUF value type -> numpy dtype for the fixed-size scalars (8 = string, 9 = array).
_SCALAR = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFError(GarageError):
    """A GGUF file that cannot be read; the message names the file and the problem."""


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its bytes stay memory-mapped until asked for."""

    name: str
    qtype: str  # GGML type name, e.g. "Q4_1"
    shape: tuple[int, ...]  # PyTorch order: outermost dimension first
    raw: np.ndarray  # memory-mapped uint8 bytes
    offset: int = 0  # where the bytes start in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return self.raw.nbytes

    def raw_bytes(self) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor shaped (rows, bytes per row), no copy."""
        with warnings.catch_warnings():
            # The map is read-only and we never write through it.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.raw)
        return t.reshape(self.shape[0] if len(self.shape) > 1 else 1, -1)

    def to_float(self) -> torch.Tensor:
        """Dequantize to a float32 tensor of `shape`."""
        return dequantize(self.raw_bytes(), self.qtype, self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated GGUF header (needs byte {start + n}, file has "
                f"{len(self.buf)}); download the file again"
            )
        self.pos += n
        return start

    def scalar(self, vtype: int) -> Any:
        dt = np.dtype(_SCALAR[vtype])
        return np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize))[0].item()

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        if count > (len(self.buf) - self.pos) // 8:  # each string takes 8 bytes of length at least
            self.take(len(self.buf) + 1)  # raises the truncation error
        # the package's C helpers (built with it): a 262k vocabulary in ~30 ms, not 0.3 s
        from garagelm.quant.cpu import kernels

        if kernels is not None:  # else built without a C compiler: the loop below
            got = kernels.gguf_strings(self.buf, self.pos, count)
            if got is None:
                self.take(len(self.buf) + 1)  # raises the truncation error
            out, self.pos = got
            return out
        # Vocabularies hold 50k-260k strings: one tight loop, bounds checked once per string.
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                break
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        if len(out) != count:
            self.take(end + 1)  # raises the truncation error
        return out

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _SCALAR:
                dt = np.dtype(_SCALAR[etype])
                return np.frombuffer(self.buf, dt, count, self.take(count * dt.itemsize))
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype, key) for _ in range(count)]
        raise GGUFError(f"{self.path}: metadata {key!r} has unknown value type {vtype}; corrupt file")


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (key -> value) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a folder, expected a .gguf file")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != GGUF_MAGIC:
                f.seek(0)
                raise GGUFError(
                    f"{self.path}: not a GGUF file (starts with {f.read(4)!r}, expected "
                    f"{GGUF_MAGIC!r}); check the path or download the model again"
                )
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse(size)

    def _parse(self, size: int) -> None:
        cur = _Cursor(self._map, self.path)
        cur.take(4)
        version = cur.u32()
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 or 3 are)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > size or n_kv > size:
            raise GGUFError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} keys; corrupt file")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.u32(), key)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions; corrupt file")
            dims = [cur.u64() for _ in range(n_dims)]
            infos.append((name, dims, cur.u32(), cur.u64()))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        for name, dims, type_id, offset in infos:
            self.tensors[name] = self._tensor(name, dims, type_id, data_start + offset, size)

    def _tensor(self, name: str, dims: list[int], type_id: int, start: int, size: int) -> GGUFTensor:
        qtype = GGML_TYPE_NAMES.get(type_id)
        if qtype is None:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has unknown GGML type id {type_id}; the file is "
                "corrupt or newer than this garagelm"
            )
        if qtype not in BLOCK_LAYOUT:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has GGML type {qtype}, which garagelm cannot read "
                f"yet (supported: {', '.join(BLOCK_LAYOUT)}); convert the model to one of those"
            )
        block, type_size = BLOCK_LAYOUT[qtype]
        n_elements = math.prod(dims)
        if dims and dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of {block}")
        n_bytes = n_elements // block * type_size
        if start + n_bytes > size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} data runs past the end of the file (needs bytes "
                f"up to {start + n_bytes}, file has {size}); the file is truncated, download it again"
            )
        raw = np.frombuffer(self._map, np.uint8, n_bytes, start)
        return GGUFTensor(name, qtype, tuple(reversed(dims)), raw, start)

    def release(self, tensor: GGUFTensor) -> None:
        """Unmap the pages of a tensor whose bytes were copied into another layout, so that they
        stop counting in this process's memory (they stay in the page cache; reading the tensor
        again maps them back). Loading a model tensor by tensor then never holds the file and
        its repacked copy at once."""
        self.release_bytes(tensor.offset, tensor.n_bytes)

    def populate_bytes(self, offset: int, n_bytes: int) -> None:
        """Map a byte range's pages (already in the page cache) in one call before it is read:
        a 178 MB embedding otherwise takes ~45k page faults, a third of a model's load. Best
        effort: kernels before 5.14 lack MADV_POPULATE_READ and fault the pages on first touch."""
        if not hasattr(self._map, "madvise") or n_bytes <= 0:  # pragma: no cover (non-Linux)
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map.madvise(MADV_POPULATE_READ, start, offset + n_bytes - start)
        except OSError:
            pass

    def release_bytes(self, offset: int, n_bytes: int) -> None:
        """release() for a byte range of the file (a slice of a tensor's rows)."""
        if not hasattr(self._map, "madvise") or n_bytes <= 0:  # pragma: no cover (non-Linux)
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, offset + n_bytes - start)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no general.architecture; not a model file")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]
