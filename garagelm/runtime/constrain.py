"""Constrained decoding: outputs that always parse (JSON, a JSON schema), through llguidance.

llguidance (Microsoft's maintained grammar engine, also used by llama.cpp) computes, before
each token, which tokens keep the output inside the grammar; the others are masked out of the
logits before sampling. It is imported only when a request asks for a format.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import torch

from garagelm.errors import GarageError

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # our Tokenizer -> LLTokenizer
_LOCK = threading.Lock()


class _Vocabulary:
    """The interface llguidance's TokenizerWrapper reads: exact bytes per token, control tokens
    marked with a leading 0xFF (they never match text), and an encoder."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        from garagelm.runtime.tokenizer import CONTROL, UNKNOWN, UNUSED

        control = {i for i, kind in enumerate(tokenizer.types) if kind in (CONTROL, UNKNOWN, UNUSED)}
        self.tokens = [
            b"\xff" + tokenizer.tokens[i].encode() if i in control else raw
            for i, raw in enumerate(tokenizer.token_bytes)
        ]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(control)

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text)


def _lltokenizer(tokenizer):
    try:
        import llguidance
    except ImportError:
        raise GarageError("structured output needs llguidance: pip install llguidance") from None
    with _LOCK:
        lt = _CACHE.get(tokenizer)
        if lt is None:  # about a second for a 50k vocabulary: built once per tokenizer
            eos = sorted(tokenizer.eog_ids) or None
            lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=eos)
            _CACHE[tokenizer] = lt
        return lt


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for JSON matching `schema` (None: any JSON object), compact as the model likes."""
    try:
        import llguidance
    except ImportError:
        raise GarageError("structured output needs llguidance: pip install llguidance") from None

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not None else {"type": "object"}),
            defaults={"whitespace_flexible": False},
        )
    except ValueError as e:
        raise GarageError(f"invalid JSON schema: {e}") from None


class Constraint:
    """The grammar state of one reply: masks logits, follows the sampled tokens."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self._matcher = llguidance.LLMatcher(_lltokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise GarageError(f"the grammar is not usable: {self._matcher.get_error()}")

    @staticmethod
    def check(tokenizer, grammar: str) -> None:
        """Raise GarageError naming the problem when the grammar cannot be used."""
        import llguidance

        err = llguidance.LLMatcher.validate_grammar(grammar, _lltokenizer(tokenizer))
        if err and not err.startswith("WARNING"):
            raise GarageError(f"the output format cannot be used: {err}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed = allowed[: logits.shape[-1]].bool()
        if allowed.shape[0] < logits.shape[-1]:  # model rows past the tokenizer's vocabulary
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GarageError(f"constrained decoding went wrong: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete (only an end token may follow)."""
        return self._matcher.is_stopped()
