"""FP8 (E4M3) weights with 128x128 block scales, as DeepSeek-V3 ships its checkpoints.

Each linear weight is cut into 128x128 tiles; a tile's scale maps its largest magnitude to
E4M3's largest finite value (448). The file holds `weight` as float8_e4m3fn and
`weight_scale_inv` (float32, one per tile): weight ~= fp8 * weight_scale_inv. Embeddings, norms
and the output head stay in the source's float type, as DeepSeek-V3 keeps them.

What CPU PyTorch does with FP8: it stores float8_e4m3fn tensors and converts them to and from
other float types, but has no FP8 matrix multiply on the CPU (torch._scaled_mm is a GPU
kernel). So FP8Linear keeps the weights in FP8 (1 byte each, the memory saving) and turns one
layer's weights back into float32 for each product; the arithmetic is float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from garagelm.errors import GarageError

BLOCK = 128
E4M3_MAX = 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (float8_e4m3fn weight, float32 weight_scale_inv per 128x128 tile)."""
    if w.dim() != 2:
        raise ValueError("FP8 block quantization takes 2-D weights")
    if not torch.isfinite(w).all():
        raise GarageError("the weight holds NaN or infinite values")
    rows, cols = w.shape
    tr, tc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = F.pad(w.float(), (0, tc * BLOCK - cols, 0, tr * BLOCK - rows))
    tiles = padded.view(tr, BLOCK, tc, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3))  # (tr, tc)
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(tr * BLOCK, tc * BLOCK)[:rows, :cols].contiguous(), scale_inv


def dequantize_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    rows, cols = q.shape
    s = scale_inv.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (q.to(torch.float32) * s).to(dtype)


class FP8Linear(nn.Module):
    """A linear layer whose weight stays FP8 in memory (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale_inv", scale_inv.float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_fp8(self.weight_fp8, self.weight_scale_inv, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _quantized_name(name: str) -> bool:
    """Which weights become FP8: the products inside the blocks."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def write_fp8_folder(src: str | Path, dst: str | Path, quiet: bool = False) -> dict:
    """A Hugging Face folder -> the same model with FP8 block-scaled linear weights, as a new
    folder (config.json gains DeepSeek-V3's quantization_config; tokenizer files are copied)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from garagelm.formats.safetensors import HFFolder

    src, dst = Path(src), Path(dst)
    if dst.exists() and not _is_fp8_folder(dst):
        raise GarageError(
            f"{dst} exists and is not an earlier FP8 output; choose another --out (nothing was changed)"
        )
    folder = HFFolder(src)
    if (folder.config.get("quantization_config") or {}).get("quant_method") == "fp8":
        raise GarageError(f"{src} is FP8 already")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out, stats = {}, {"fp8": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}
    for name, t in tqdm(list(folder.tensors()), desc="-> FP8", unit="tensor", disable=quiet, leave=False):
        stats["bytes_in"] += t.numel() * t.element_size()
        if _quantized_name(name) and t.dim() == 2:
            q, s = quantize_fp8(t)
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            stats["fp8"] += 1
        else:
            out[name] = t.contiguous()
            stats["kept"] += 1
    stats["bytes_out"] = sum(t.numel() * t.element_size() for t in out.values())
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = dict(folder.config)
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
    }  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and f.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return stats


def _is_fp8_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"
