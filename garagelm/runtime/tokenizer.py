"""Tokenizers rebuilt from GGUF metadata, matching llama.cpp.

Two vocabularies exist in GGUF files: `gpt2` (byte-level BPE with merges and a pre-tokenizer
regex named by `tokenizer.ggml.pre`, run by the `tokenizers` library) and `llama`
(SentencePiece: pieces with scores, byte fallback, spaces written as U+2581, encoded by
runtime/spm.py as llama.cpp does). Detokenisation does not go through `tokenizers`: every
token maps to its exact bytes, and an incremental UTF-8 decoder turns them into text, so a
stream never shows half a character.
"""

from __future__ import annotations

import codecs
import gc
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from garagelm.runtime.pretokenizers import pre_tokenizer_for
from garagelm.runtime.spm import SentencePiece

# GGUF token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"

# Token texts llama.cpp also treats as end of generation when they are control tokens.
_EOG_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>", "<|eom_id|>", "_<EOT>",
}  # fmt: skip


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-unicode map, inverted: char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class Tokenizer:
    """Text <-> token ids for one model, with llama.cpp's special-token semantics."""

    def __init__(self, metadata: Mapping[str, Any]):
        self.kind: str = metadata.get("tokenizer.ggml.model", "")
        if self.kind not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported tokenizer model {self.kind!r} (tokenizer.ggml.model); "
                "garagelm reads 'gpt2' (BPE) and 'llama' (SentencePiece) vocabularies"
            )
        self.tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        n = len(self.tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        self.types: list[int] = (
            np.asarray(types, dtype=np.int64).tolist() if types is not None else [NORMAL] * n
        )
        self.bos_id: int | None = _opt_id(metadata, "tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = _opt_id(metadata, "tokenizer.ggml.eos_token_id")
        spm = self.kind == "llama"
        pre = None if spm else pre_tokenizer_for(metadata.get("tokenizer.ggml.pre"))
        default_bos = True if spm else bool(pre.add_bos)
        self.add_bos: bool = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos: bool = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix: bool = bool(metadata.get("tokenizer.ggml.add_space_prefix", spm))
        self.eog_ids: set[int] = self._end_of_generation(metadata)
        self.token_bytes: TokenBytes = self._token_bytes()
        self._spm: SentencePiece | None = None
        self._scores = metadata.get("tokenizer.ggml.scores")
        if spm:  # encoded directly from the pieces (runtime/spm.py); no tokenizers object to build
            unk = next(iter(self._ids_of_types(UNKNOWN)), None)
            scores = self._scores if self._scores is not None else [0.0] * n
            self._spm = SentencePiece(self.tokens, np.asarray(scores, dtype=np.float32).tolist(),
                                      self.add_space_prefix, self._ids_of_types(CONTROL, UNKNOWN),
                                      self._ids_of_types(USER_DEFINED), unk)  # fmt: skip
            self._tk = None
        else:
            self._tk = self._build_bpe(metadata.get("tokenizer.ggml.merges") or [], pre)

    @classmethod
    def from_hf(cls, folder: Path) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json run by the `tokenizers` library as it is,
        special tokens and BOS/EOS from tokenizer_config.json (and generation_config.json)."""
        import json

        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tk = HFTokenizer.from_file(str(path))
        spec = json.loads(path.read_text())
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self = cls.__new__(cls)
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
        self.kind = "gpt2" if byte_level else "llama"
        vocab = tk.get_vocab(with_added_tokens=True)
        self.tokens = [""] * (max(vocab.values()) + 1)
        for text, i in vocab.items():
            self.tokens[i] = text
        self.types = [
            BYTE if self.kind == "llama" and len(t) == 6 and t.startswith("<0x") else NORMAL
            for t in self.tokens
        ]
        for added in spec.get("added_tokens", []):
            self.types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED

        def token_id(key: str) -> int | None:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return vocab.get(v) if isinstance(v, str) else None

        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
        self.add_bos = bool(cfg.get("add_bos_token", self.kind == "llama")) and self.bos_id is not None
        self.add_eos = bool(cfg.get("add_eos_token", False))
        self.add_space_prefix = False  # tokenizer.json's own normalizer does what is needed
        self.eog_ids = {self.eos_id} if self.eos_id is not None else set()
        self.eog_ids |= {i for i in self._ids_of_types(CONTROL) if self.tokens[i] in _EOG_TEXTS}
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            self.eog_ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        self.token_bytes = self._token_bytes()
        self._tk, self._spm = tk, None
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # -- building ---------------------------------------------------------------------------
    def _end_of_generation(self, metadata: Mapping[str, Any]) -> set[int]:
        ids = {self.eos_id} if self.eos_id is not None else set()
        for key in ("eot_token_id", "eom_token_id"):
            tid = _opt_id(metadata, f"tokenizer.ggml.{key}")
            if tid is not None:
                ids.add(tid)
        for i in self._ids_of_types(CONTROL, USER_DEFINED):
            if self.tokens[i] in _EOG_TEXTS:
                ids.add(i)
        return ids

    def _ids_of_types(self, *kinds: int) -> list[int]:
        """Ids of the tokens of these types, in order (a few thousand of a 262k vocabulary)."""
        return np.flatnonzero(np.isin(np.asarray(self.types), kinds)).tolist()

    def _token_bytes(self) -> TokenBytes:
        return TokenBytes(self)

    def _bytes_of(self, i: int) -> bytes:
        """Token i's bytes as text (empty for control tokens, rendered only on request)."""
        text, kind = self.tokens[i], self.types[i]
        if kind in (CONTROL, UNKNOWN, UNUSED):
            return b""  # see decode(special=True)
        if kind == USER_DEFINED:
            return text.encode()
        if self.kind == "llama":
            if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
                return bytes([int(text[3:5], 16)])
            return text.replace(SPIECE_SPACE, " ").encode()
        try:
            return text.translate(_to_latin1()).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte map: its own UTF-8
            byte_dec = _byte_decoder()
            return b"".join(bytes([byte_dec[c]]) if c in byte_dec else c.encode() for c in text)

    def _added_tokens(self):
        from tokenizers import AddedToken

        added = []
        for i in self._ids_of_types(CONTROL, UNKNOWN, USER_DEFINED):
            text, kind = self.tokens[i], self.types[i]
            if kind in (CONTROL, UNKNOWN):
                added.append(AddedToken(text, special=True, normalized=False))
            elif kind == USER_DEFINED:
                added.append(AddedToken(text, special=False, normalized=False))
        return added

    def _vocab(self) -> dict[str, int]:
        # Duplicate texts: the last id wins, as in llama.cpp's text -> id map.
        return {t: i for i, t in enumerate(self.tokens)}

    def _build_bpe(self, merges: list[str], pre):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        pairs = [tuple(m.split(" ", 1)) for m in merges]
        model = models.BPE(vocab=self._vocab(), merges=pairs, ignore_merges=pre.ignore_merges)
        tk = Tokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tk.add_tokens(self._added_tokens())
        return tk

    def hf_tokenizer(self):
        """This vocabulary as a `tokenizers` object (to write a tokenizer.json). A SentencePiece
        vocabulary is built for it on first use: encoding does not need it."""
        if self._tk is None:
            self._tk = self._build_spm(self._scores)
        return self._tk

    def _build_spm(self, scores):
        """The SentencePiece vocabulary as a `tokenizers` BPE. Deriving the merges of a 262k
        vocabulary (Gemma 3) takes seconds in Python, so they are cached on disk as token-id
        pairs (a plain .npy, no pickle); the BPE is then built from them in memory, which
        costs a third of the time and peak memory of parsing a tokenizer.json of 500k merges."""
        from tokenizers import Tokenizer, models, normalizers

        if scores is None:
            scores = [0.0] * len(self.tokens)
        vocab = self._vocab()
        pairs = self._spm_merges(vocab, scores)
        unk = next((t for t, k in zip(self.tokens, self.types) if k == UNKNOWN), None)
        toks = self.tokens
        gc_was_on = gc.isenabled()
        gc.disable()  # 500k new tuples would set off full collections of the whole heap
        try:
            merges = [(toks[a], toks[b]) for a, b in zip(pairs[:, 0].tolist(), pairs[:, 1].tolist())]
            model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
            del merges
        finally:
            if gc_was_on:
                gc.enable()
        tk = Tokenizer(model)
        steps = [normalizers.Prepend(SPIECE_SPACE)] if self.add_space_prefix else []
        tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
        tk.add_tokens(self._added_tokens())
        _release_freed_heap()
        return tk

    def _spm_merges(self, vocab: dict[str, int], scores) -> np.ndarray:
        """(n, 2) token ids of the merges in rank order, from the disk cache when it has them."""
        key = hashlib.sha256()
        key.update(b"spm-merges-v2")
        key.update("\x00".join(self.tokens).encode("utf-8", "surrogatepass"))
        key.update(bytes(self.types) if max(self.types, default=0) < 256 else repr(self.types).encode())
        key.update(np.asarray(scores, dtype=np.float32).tobytes())
        cached = _cache_dir() / f"spm-{key.hexdigest()[:32]}.npy"
        if cached.is_file():
            try:
                pairs = np.load(cached, allow_pickle=False)
                if (
                    pairs.ndim == 2
                    and pairs.shape[1] == 2
                    and pairs.dtype.kind == "i"
                    and (pairs.size == 0 or (pairs.min() >= 0 and pairs.max() < len(self.tokens)))
                ):
                    return pairs
            except Exception:  # empty, truncated or not an array at all: derive them again
                pass
            cached.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        pairs = self._derive_spm_merges(vocab, scores)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp.npy")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, pairs, allow_pickle=False)
            os.replace(tmp, cached)
            for old in cached.parent.glob("spm-*.json*"):  # whole tokenizers cached by older versions
                old.unlink(missing_ok=True)
        except OSError:
            tmp.unlink(missing_ok=True)  # no writable cache: derive them each time
        return pairs

    def _derive_spm_merges(self, vocab: dict[str, int], scores) -> np.ndarray:
        # SentencePiece BPE merges the adjacent pair whose union has the highest score; as
        # ranked merges that is every split (a, b) of a piece with both halves in the vocab.
        ranked = []
        for piece, pid in vocab.items():
            if self.types[pid] == BYTE or len(piece) < 2:
                continue
            for k in range(1, len(piece)):
                a, b = vocab.get(piece[:k]), vocab.get(piece[k:])
                if a is not None and b is not None:
                    ranked.append((-float(scores[pid]), pid, k, a, b))
        ranked.sort()
        return np.array([(a, b) for *_, a, b in ranked], dtype=np.int32).reshape(-1, 2)

    # -- use --------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids for `text`.

        add_special: add BOS/EOS as the model's metadata asks. parse_special: control tokens
        written in the text (e.g. "<|im_start|>") become their ids; otherwise they are plain
        text, as llama.cpp does for untrusted input.
        """
        if not text:
            ids = []
        elif self._spm is not None:
            ids = self._spm.encode(text, parse_special)
        else:
            self._tk.encode_special_tokens = not parse_special
            ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special and self.add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        if special and self.types[token_id] in (CONTROL, UNKNOWN):
            return self.tokens[token_id].encode()
        return self.token_bytes[token_id]

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        data = b"".join(self.token_to_bytes(i, special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class TokenBytes(Sequence):
    """Every token's bytes, each worked out the first time it is asked for: a 262k vocabulary
    costs ~0.2 s and ~11 MiB to convert whole, and most of it is never printed."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._cache: list[bytes | None] = [None] * len(tokenizer.tokens)

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        got = self._cache[i]
        if got is None:
            got = self._cache[i] = self._tok._bytes_of(i)
        return got


@lru_cache(maxsize=1)
def _to_latin1() -> dict[int, int | str]:
    """GPT-2 byte-level text -> bytes in C: each printable stand-in maps to its byte's latin-1
    character; characters below 256 that are not stand-ins become U+FFFF, so the encode fails
    and the exact fallback handles them."""
    byte_dec = _byte_decoder()
    return str.maketrans(
        {**{chr(i): "\uffff" for i in range(256)}, **{c: chr(b) for c, b in byte_dec.items()}}
    )


def _opt_id(metadata: Mapping[str, Any], key: str) -> int | None:
    v = metadata.get(key)
    return None if v is None or int(v) < 0 else int(v)


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise): building a large
    vocabulary frees ~100 MiB of temporaries that would stay in the process's RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "garagelm" / "tokenizers"
