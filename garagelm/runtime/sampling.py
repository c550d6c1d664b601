"""Sampling: small logit processors composed in llama.cpp's order, then a draw."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """llama.cpp's defaults; temperature <= 0 means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    # OpenAI's: subtracted once per token already generated (presence) / per occurrence (frequency)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # llguidance grammar the output must follow (see constrain.py)


def repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens seen recently: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)))
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the top token's."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


class Sampler:
    """Picks the next token from a logits vector; owns the random generator for --seed."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()
        self.counts: dict[int, int] = {}  # tokens this sampler has produced, for OpenAI's penalties

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.params
        recent = history[-p.repeat_last_n :] if p.repeat_last_n > 0 else []
        logits = repeat_penalty(logits.float(), recent, p.repeat_penalty)
        logits = self._openai_adjust(logits)
        if p.temperature <= 0:  # numpy's argmax: 3 us over a 49k vocabulary, torch's 76 us
            tok = int(logits.contiguous().numpy().argmax())  # (both: the first of equal maxima)
        else:
            logits = min_p(top_p(top_k(logits, p.top_k), p.top_p), p.min_p)
            probs = (logits / p.temperature).softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=self.gen))
        self.counts[tok] = self.counts.get(tok, 0) + 1
        return tok

    def _openai_adjust(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not (p.logit_bias or (self.counts and (p.presence_penalty or p.frequency_penalty))):
            return logits
        logits = logits.clone()
        for tok, n in self.counts.items():
            logits[tok] -= p.presence_penalty + p.frequency_penalty * n
        for tok, bias in p.logit_bias.items():
            logits[tok] += bias
        return logits
