"""Re-encode a model's weights as a GGUF: quantize (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, K-quant mixes)
or convert to float (F32, F16, BF16). The source is a GGUF file or a Hugging Face folder (read
through formats/hf_gguf.py). Metadata (tokenizer, chat template, architecture) is carried over
and `general.file_type` set; the file is written under a temporary name and renamed.

Which tensors get which type, in llama.cpp's spirit: 1-D tensors (norms, biases) stay F32; the
output head (or the embedding that doubles as it) keeps Q8_0 when the target has fewer bits,
as llama.cpp gives it more bits; a tensor whose rows are not whole 32-value blocks stays F16
and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from garagelm.errors import GarageError
from garagelm.formats.ggml_quantize import TYPES as QUANT_TYPES
from garagelm.formats.ggml_quantize import quantize
from garagelm.formats.gguf_write import add_value
from garagelm.formats.kquantize import quantize_k

FLOAT_TYPES = ("F32", "F16", "BF16")
MIXES = ("Q4_K_M", "Q5_K_M", "Q6_K")  # llama.cpp's K-quant file types
# llama.cpp's llama_ftype numbers, written as general.file_type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15,
              "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}  # fmt: skip
# a K-quant tensor whose rows are not whole 256-value blocks falls back as llama.cpp does
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q5_1": 6, "Q5_0": 5.5, "Q4_1": 5, "Q4_0": 4.5,
        "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q5_K_M": 5.5, "Q4_K_M": 4.5, "FP8": 8.25}  # fmt: skip


@dataclass
class Report:
    path: Path
    types: dict[str, str] = field(default_factory=dict)  # tensor -> type written
    kept: list[str] = field(default_factory=list)  # tensors left at higher precision, and why
    bytes_in: int = 0
    bytes_out: int = 0


def _source_bits(g) -> float:
    """Bits per weight of the source's 2-D tensors (the precision it can give)."""
    total = bits = 0
    for t in g.tensors.values():
        if len(t.shape) == 2:
            total += t.n_elements
            bits += t.n_elements * BITS.get(t.qtype, 16)
    return bits / total if total else 32


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    target: str,
    allow_requantize: bool = False,
    quiet: bool = False,
    importance: dict[str, torch.Tensor] | None = None,
) -> Report:
    """importance: an importance matrix (quant/imatrix.py) by tensor name; weights the rounding."""
    import gguf
    from tqdm import tqdm

    target = target.upper()
    if target not in QUANT_TYPES + MIXES + FLOAT_TYPES:
        raise GarageError(
            f"unknown type {target!r}; choose one of {', '.join(QUANT_TYPES + MIXES + FLOAT_TYPES)}"
        )
    g = open_source(src)
    have = _source_bits(g)
    if target not in FLOAT_TYPES and have < BITS[target] and not allow_requantize:
        raise GarageError(
            f"{src} holds about {have:.1f} bits a weight, fewer than {target} ({BITS[target]}): quantizing it "
            "cannot bring back what was lost; start from a 16-bit source (or pass --allow-requantize)"
        )
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    report = Report(dst)
    w = gguf.GGUFWriter(tmp, arch=g.architecture)
    for k, v in g.metadata.items():
        if k not in ("general.architecture", "general.file_type") and not k.startswith("GGUF."):
            add_value(w, k, v)
    w.add_uint32("general.file_type", FILE_TYPES[target])
    head = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
    try:
        for name, t in tqdm(
            g.tensors.items(), desc=f"-> {target}", unit="tensor", disable=quiet, leave=False
        ):
            x = t.to_float()
            if not torch.isfinite(x).all():
                raise GarageError(f"{src}: tensor {name} holds NaN or infinite values; the source is damaged")
            report.bytes_in += t.n_bytes
            kind = _type_for(name, x, target, head, report, int(g.get(f"{g.architecture}.block_count", 0)))
            report.types[name] = kind
            imp = (importance or {}).get(name)
            if kind in K_FALLBACK:
                data = quantize_k(x, kind, imp).numpy()
                w.add_tensor(
                    name, data, raw_shape=data.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, kind)
                )
            elif kind in QUANT_TYPES:
                data = quantize(x, kind, imp).numpy()
                w.add_tensor(
                    name, data, raw_shape=data.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, kind)
                )
            elif kind == "BF16":
                data = x.to(torch.bfloat16).view(torch.uint16).numpy()
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                data = x.to(torch.float16 if kind == "F16" else torch.float32).numpy()
                w.add_tensor(name, data)
            report.bytes_out += data.nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        tmp.replace(dst)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return report


def open_source(src: str | Path):
    """A GGUFFile, or a Hugging Face folder behind the same interface."""
    from garagelm.formats.gguf import GGUFFile

    if Path(src).is_dir():
        from garagelm.formats.hf_gguf import HFSource

        return HFSource(src)
    return GGUFFile(src)


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mix_type(name: str, target: str, head: str, n_layers: int) -> str:
    """llama.cpp's choice per tensor for Q4_K_M / Q5_K_M / Q6_K (llama-family tensors)."""
    if target == "Q6_K" or name == head:
        return "Q6_K"
    base = "Q4_K" if target == "Q4_K_M" else "Q5_K"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and layer >= 0 and _more_bits(layer, n_layers):
        return "Q6_K"
    return base


def _type_for(name: str, x: torch.Tensor, target: str, head: str, report: Report, n_layers: int = 0) -> str:
    if x.dim() < 2:
        return "F32"
    if target in FLOAT_TYPES:
        return target
    if target in MIXES:
        kind = _mix_type(name, target, head, n_layers)
        if x.shape[-1] % 256 == 0:
            return kind
        target = K_FALLBACK[kind]  # then the 32-value rules below
    if x.shape[-1] % 32:
        report.kept.append(f"{name}: rows of {x.shape[-1]} values are not whole 32-value blocks, kept at F16")
        return "F16"
    if name == head and BITS[target] < BITS["Q8_0"]:
        return "Q8_0"
    return target


def bits_per_weight(path: str | Path) -> float:
    from garagelm.formats.gguf import GGUFFile

    g = GGUFFile(path)
    n = sum(t.n_elements for t in g.tensors.values())
    return sum(t.n_bytes for t in g.tensors.values()) * 8 / max(n, 1)
