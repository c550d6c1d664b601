"""A model file -> everything needed to generate: weights, tokenizer, chat template."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from garagelm.errors import GarageError
from garagelm.formats.gguf import GGUFFile
from garagelm.runtime.chat_template import ChatTemplate
from garagelm.runtime.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile | None  # None for a Hugging Face folder
    model: nn.Module
    tokenizer: Tokenizer
    template_source: str | None
    context_length: int
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    architecture: str = ""

    def chat_template(self, override: str | None = None) -> ChatTemplate:
        source = override or self.template_source
        if not source:
            raise GarageError(
                f"{self.path.name} has no chat template (tokenizer.chat_template); use --raw to send "
                "plain text, or --template FILE to give one"
            )
        tok = self.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        return ChatTemplate(source, bos, eos)

    def encode_chat(self, template: ChatTemplate, messages: list[dict], **extra) -> list[int]:
        """Token ids of the rendered conversation, ready for the model's reply."""
        tok = self.tokenizer
        text = template.render(messages, add_generation_prompt=True, **extra)
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        add_bos = not (bos and text.startswith(bos))  # templates that write BOS themselves
        return tok.encode(text, add_special=add_bos, parse_special=True)


def load_model(path: str | Path) -> LoadedModel:
    """Load a GGUF file; errors name the file and what to do."""
    from garagelm.models import from_gguf
    from garagelm.quant.ggml_linear import set_threads
    from garagelm.quant.hugepages import heap_for_temporaries

    t0 = time.perf_counter()
    heap_for_temporaries()  # prefill's multi-MB temporaries from the heap, not fresh mmaps
    path = Path(path)
    set_threads(torch.get_num_threads())  # the C kernels use as many threads as torch
    if path.is_dir():
        return _load_hf(path, t0)
    gguf = GGUFFile(path)
    # The tokenizer is built beside the model: loading a large vocabulary happens mostly in
    # Rust, without the GIL, while the weights are mapped and packed.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(Tokenizer, gguf.metadata)
        model = from_gguf(gguf, dtype=torch.float32)
        try:
            tokenizer = pending.result()
        except (ValueError, KeyError) as e:
            raise GarageError(f"{path}: cannot build the tokenizer: {e}") from None
    arch = gguf.architecture
    ctx = int(gguf.get(f"{arch}.context_length", 2048))
    return LoadedModel(
        path=path,
        gguf=gguf,
        model=model,
        tokenizer=tokenizer,
        template_source=gguf.get("tokenizer.chat_template"),
        context_length=ctx,
        architecture=arch,
        load_seconds=time.perf_counter() - t0,
    )


def _load_hf(path: Path, t0: float) -> LoadedModel:
    """A Hugging Face folder: config.json, safetensors weights (float32, or kept 16-bit when stored so), tokenizer.json."""
    import json

    from garagelm.formats.safetensors import HFFolder
    from garagelm.models import HF_TYPES, from_hf

    folder = HFFolder(path)
    try:
        tokenizer = Tokenizer.from_hf(path)
    except (ValueError, KeyError) as e:
        raise GarageError(f"{path}: cannot build the tokenizer: {e}") from None
    model = from_hf(folder)
    template = None
    cfg_file, jinja = path / "tokenizer_config.json", path / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    elif cfg_file.is_file():
        template = json.loads(cfg_file.read_text()).get("chat_template")
    text_cfg = folder.config.get("text_config", folder.config)
    return LoadedModel(
        path=path,
        gguf=None,
        model=model,
        tokenizer=tokenizer,
        template_source=template if isinstance(template, str) else None,
        context_length=int(text_cfg.get("max_position_embeddings", 4096)),
        load_seconds=time.perf_counter() - t0,
        architecture=HF_TYPES[folder.config["model_type"]],
    )
