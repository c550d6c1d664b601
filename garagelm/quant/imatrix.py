"""Importance matrix: how strongly each input column of each weight is used, measured on a
calibration text (the mean square of the activations entering the layer, as llama.cpp's
imatrix tool records). Quantization then weights each value's rounding error by it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from garagelm.errors import GarageError


@torch.inference_mode()
def collect(
    path: str | Path, text: str, ctx: int = 512, max_windows: int = 16, quiet: bool = False
) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: mean squared input per column} for the linear weights of a model (a
    GGUF file or a Hugging Face folder)."""
    from tqdm import tqdm

    from garagelm.formats.names import hf_to_gguf
    from garagelm.models import from_gguf, from_hf
    from garagelm.quant.convert import open_source
    from garagelm.runtime.tokenizer import Tokenizer

    g = open_source(path)
    if Path(path).is_dir():
        model, tokenizer = from_hf(g.folder), Tokenizer.from_hf(Path(path))
    else:
        model, tokenizer = from_gguf(g, quantized=False), Tokenizer(g.metadata)  # one float layer per weight
    ids = tokenizer.encode(text, add_special=True)
    if len(ids) < 64:
        raise GarageError(f"the calibration text has only {len(ids)} tokens; give at least a few paragraphs")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        chunks = [ids[i : i + ctx] for i in range(0, len(ids), ctx)][:max_windows]
        for chunk in tqdm(chunks, desc="calibration", unit="win", disable=quiet, leave=False):
            model(torch.tensor([chunk]))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, total in sums.items():
        key = "output.weight" if name == "lm_head" else hf_to_gguf(name + ".weight", g.architecture)
        if key == "output.weight" and "output.weight" not in g.tensors:
            key = "token_embd.weight"  # tied: the embedding is the output head
        out[key] = total / counts[name]
    return out
