"""A Hugging Face folder read as if it were a GGUF file, so the quantizer takes either.

`HFSource` offers what quant/convert.py reads from a GGUFFile: the architecture, the metadata
llama.cpp expects (model keys from config.json, tokenizer keys from tokenizer.json) and the
tensors under GGUF names, in GGUF's layout (llama's Q/K rows permuted, Gemma's norms with the 1
added, FP8 weights dequantized), each read from its memory-mapped shard only when asked for.

Tokenizers: byte-level BPE (Llama 3, Qwen2/3, the DeepSeek-R1 distills, SmolLM) keeps its
merges, with the pre-tokenizer name in runtime/pretokenizers.py whose splits are those of
tokenizer.json; a SentencePiece vocabulary held as a byte-fallback BPE (Gemma, Llama 2,
Mistral) gets back per-piece scores from the order of its merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from garagelm.errors import GarageError
from garagelm.formats.gguf_write import extra_tensors, gguf_layout, model_metadata
from garagelm.formats.names import hf_to_gguf
from garagelm.formats.safetensors import HFFolder

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "FP8"}
# tokenizer.json writes the contractions case-insensitively; llama.cpp's tables spell them out
_CONTRACTIONS_HF = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


@dataclass
class HFTensor:
    """One weight of the folder, loaded and laid out as GGUF wants it on to_float()."""

    source: HFSource
    hf_name: str
    shape: tuple[int, ...]
    qtype: str

    @property
    def n_elements(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def n_bytes(self) -> int:
        return self.n_elements * {"F32": 4, "F16": 2, "BF16": 2, "FP8": 1}[self.qtype]

    def to_float(self) -> torch.Tensor:
        return self.source.load(self.hf_name)


class HFSource:
    """config.json + safetensors + tokenizer files, seen through the GGUFFile interface."""

    def __init__(self, path: str | Path):
        from garagelm.models import ARCHITECTURES, HF_TYPES

        self.path = Path(path)
        self.folder = HFFolder(self.path)
        model_type = self.folder.config.get("model_type")
        if model_type not in HF_TYPES:
            raise GarageError(f"{self.path}: model_type {model_type!r} is not supported yet "
                              f"(supported: {', '.join(HF_TYPES)})")  # fmt: skip
        self.architecture = HF_TYPES[model_type]
        try:
            self.config = ARCHITECTURES[self.architecture][0].from_hf(self.folder.config)
        except (KeyError, ValueError) as e:
            raise GarageError(f"{self.path}/config.json: {e}") from None
        self.metadata: dict[str, Any] = {
            "general.architecture": self.architecture,
            "general.name": self.path.name,
            **model_metadata(self.architecture, self.config),
            **tokenizer_metadata(self.path),
        }
        self.tensors = self._tensors()

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _tensors(self) -> dict[str, HFTensor]:
        from safetensors import safe_open

        out: dict[str, HFTensor] = {}
        self._scales: dict[str, str] = {}
        for shard in self.folder.shards:
            with safe_open(shard, framework="pt") as st:
                for name in st.keys():
                    plain = name.removeprefix("language_model.")  # Gemma 3's multimodal checkpoints
                    if plain.startswith(("vision_tower.", "multi_modal_projector.")):
                        continue
                    if plain.endswith(".weight_scale_inv"):  # FP8 block scales, applied in load()
                        self._scales[plain.removesuffix("_scale_inv")] = name
                        continue
                    if plain == "lm_head.weight" and self.config.tie_word_embeddings:
                        continue
                    sl = st.get_slice(name)
                    dtype = _DTYPES.get(getattr(torch, _torch_dtype(sl.get_dtype())))
                    if dtype is None:
                        raise GarageError(f"{self.path}: tensor {name} is {sl.get_dtype()}; "
                                          "expected F32, F16, BF16 or FP8")  # fmt: skip
                    try:
                        gguf_name = hf_to_gguf(plain, self.architecture)
                    except KeyError as e:
                        raise GarageError(f"{self.path}: {e.args[0]}") from None
                    out[gguf_name] = HFTensor(self, name, tuple(sl.get_shape()), dtype)
        for gguf_name, t in extra_tensors(self.config).items():  # e.g. Llama 3.1's rope_freqs
            out[gguf_name] = HFTensor(self, gguf_name, tuple(t.shape), "F32")
        return out

    def load(self, hf_name: str) -> torch.Tensor:
        """One tensor as float32 in GGUF layout."""
        from safetensors import safe_open

        made = extra_tensors(self.config)
        if hf_name in made:
            return made[hf_name]

        with safe_open(self.folder.shard_of(hf_name), framework="pt") as st:
            t = st.get_tensor(hf_name)
            plain = hf_name.removeprefix("language_model.")
            if t.dtype == torch.float8_e4m3fn:
                from garagelm.quant.fp8 import dequantize_fp8

                scale_name = self._scales.get(plain)
                if scale_name is None:
                    raise GarageError(f"{self.path}: FP8 tensor {hf_name} has no weight_scale_inv")
                with safe_open(self.folder.shard_of(scale_name), framework="pt") as sc:
                    t = dequantize_fp8(t, sc.get_tensor(scale_name), torch.float32)
        return gguf_layout(plain, t.float(), self.architecture, self.config)


def _torch_dtype(st_dtype: str) -> str:
    """safetensors dtype names -> torch attribute names."""
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn"}.get(
        st_dtype, "uint8"
    )


def tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """The tokenizer.* keys llama.cpp reads, from tokenizer.json and tokenizer_config.json."""
    import numpy as np

    from garagelm.runtime.tokenizer import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GarageError(f"{folder}: no tokenizer.json; a GGUF file must carry its tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_hf(folder)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GarageError(
            f"{path}: a {model.get('type')} tokenizer model; only BPE ones are converted so far"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md: dict[str, Any] = {
        "tokenizer.ggml.tokens": tok.tokens,
        "tokenizer.ggml.token_type": np.array(tok.types, dtype=np.int32),
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos),
        "tokenizer.ggml.add_eos_token": bool(tok.add_eos),
    }
    if tok.kind == "gpt2":
        md["tokenizer.ggml.model"] = "gpt2"
        md["tokenizer.ggml.pre"] = pre_tokenizer_name(spec, path)
        md["tokenizer.ggml.merges"] = merges
    else:
        md.update(_sentencepiece_keys(spec, merges, tok.tokens, path))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    for key, gguf_key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v in vocab:
            md[f"tokenizer.ggml.{gguf_key}_token_id"] = vocab[v]
    template = folder / "chat_template.jinja"
    chat = template.read_text(encoding="utf-8") if template.is_file() else cfg.get("chat_template")
    if isinstance(chat, str):
        md["tokenizer.chat_template"] = chat
    return md


def _sentencepiece_keys(spec: dict, merges: list[str], tokens: list[str], path: Path) -> dict[str, Any]:
    """A SentencePiece vocabulary that tokenizer.json holds as a byte-fallback BPE (what the
    converters make of Gemma's, Llama 2's, Mistral's): llama.cpp wants a score per piece and
    merges the adjacent pair whose union scores highest. tokenizer.json ranks the merges by
    that score, so a piece's score here is minus the rank of its first merge; pieces no merge
    makes (characters, bytes, specials) never result from a merge and keep score 0."""
    import numpy as np

    if not (spec.get("model") or {}).get("byte_fallback"):
        raise GarageError(f"{path}: a BPE without byte-level pre-tokenization or byte fallback; not a "
                          "vocabulary llama.cpp reads")  # fmt: skip
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, r)
    scores = np.array([-float(rank[t]) if t in rank else 0.0 for t in tokens], dtype=np.float32)
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prefix = (
        '"Prepend"' in text
        or any(f'"prepend_scheme": "{p}"' in text for p in ("always", "first"))
        or '"add_prefix_space": true' in text
    )
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.add_space_prefix": prefix}  # fmt: skip


def _splits(node: dict | None, path: Path) -> list[str]:
    """The regexes a tokenizer.json pre_tokenizer applies, in order."""
    from garagelm.runtime.pretokenizers import GPT2_SPLIT

    if not node:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [r for part in node.get("pretokenizers", []) for r in _splits(part, path)]
    if kind == "ByteLevel":
        return [GPT2_SPLIT] if node.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if node.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and node.get("behavior", "Isolated") == "Isolated" and not node.get("invert"):
        pattern = node.get("pattern") or {}
        if "Regex" in pattern:
            return [pattern["Regex"]]
    raise GarageError(f"{path}: pre-tokenizer step {json.dumps(node)[:120]} is not one llama.cpp knows")


def pre_tokenizer_name(spec: dict, path: Path) -> str:
    """The tokenizer.ggml.pre value whose splits equal tokenizer.json's (first name in the table)."""
    from garagelm.runtime.pretokenizers import CONTRACTIONS, PRE_TOKENIZERS

    found = tuple(r.replace(_CONTRACTIONS_HF, CONTRACTIONS) for r in _splits(spec.get("pre_tokenizer"), path))
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges"))
    for name, pre in PRE_TOKENIZERS.items():
        if pre.regexes == found and pre.ignore_merges == ignore_merges:
            return name
    raise GarageError(
        f"{path}: its pre-tokenizer splits ({' then '.join(found) or 'none'}) match no llama.cpp "
        "pre-tokenizer garagelm knows; the GGUF would tokenize differently, so it is not written"
    )
