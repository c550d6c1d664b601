"""Quality of a model on a text: perplexity the way llama.cpp measures it, and how far a
quantized model's next-token distributions drift from its source (KL divergence, top-1).

llama.cpp's perplexity: the text is tokenized once (with BOS), cut into windows of `ctx`
tokens, the first token of each window replaced by BOS, and only the second half of each window
is scored (every scored token sees at least ctx/2 tokens before it), so figures compare with
llama.cpp's published tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from garagelm.errors import GarageError


@dataclass
class Windows:
    ids: list[list[int]]  # one list of token ids per window
    first: int  # positions [first, ctx - 1) predict the tokens that are scored


def windows(tokenizer, text: str, ctx: int = 512, limit: int | None = None) -> Windows:
    ids = tokenizer.encode(text, add_special=True)
    n = len(ids) // ctx
    if n < 1 or len(ids) < 2 * ctx:
        raise GarageError(
            f"the text has {len(ids)} tokens; perplexity at --ctx {ctx} needs at least {2 * ctx}"
        )
    n = min(n, limit) if limit else n
    out = []
    for i in range(n):
        w = ids[i * ctx : (i + 1) * ctx]
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            w[0] = tokenizer.bos_id
        out.append(w)
    return Windows(out, ctx // 2)


@torch.inference_mode()
def window_logprobs(model, w: list[int], first: int) -> torch.Tensor:
    """log-softmax of the model's next-token logits at positions first .. len(w) - 2, from
    float32 products (a quality figure must not include the bf16 rounding of fast prefill)."""
    from garagelm.quant.ggml_linear import exact_products

    with exact_products():
        logits = model(torch.tensor([w]))[0, first : len(w) - 1].float()
    return torch.log_softmax(logits, -1)


@dataclass
class Quality:
    perplexity: float
    tokens_scored: int
    kl_mean: float | None = None  # vs a reference model, nats per token
    kl_p99: float | None = None
    top1_agreement: float | None = None
    per_window: list[float] = field(default_factory=list)


def evaluate(model, wins: Windows, reference=None, progress: bool = False) -> Quality:
    """Perplexity of `model`; with `reference` (the source model), also KL(ref || model) and
    top-1 agreement at every scored position."""
    from tqdm import tqdm

    nll, count, kls, agree, per = 0.0, 0, [], 0, []
    for w in tqdm(wins.ids, desc="windows", unit="win", disable=not progress, leave=False):
        lp = window_logprobs(model, w, wins.first)
        targets = torch.tensor(w[wins.first + 1 :])
        window_nll = -lp.gather(1, targets[:, None]).sum().item()
        nll, count = nll + window_nll, count + len(targets)
        per.append(math.exp(window_nll / len(targets)))
        if reference is not None:
            ref = window_logprobs(reference, w, wins.first)
            kls.append((ref.exp() * (ref - lp)).sum(-1))
            agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
    q = Quality(math.exp(nll / count), count, per_window=per)
    if kls:
        kl = torch.cat(kls)
        q.kl_mean, q.kl_p99 = float(kl.mean()), float(torch.quantile(kl, 0.99))
        q.top1_agreement = agree / count
    return q
