"""How closely garagelm follows llama.cpp and transformers on the same GGUF file.

Prints, per file: greedy tokens equal to llama.cpp's (of 64, per prompt), top-1 agreement when
both read llama.cpp's own greedy text, and logit differences. Usage:

    python bench/reference_agreement.py MODEL.gguf [MORE.gguf ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_reference import CHAT_PROMPTS, RAW_PROMPTS, _prompt_ids, _ref_greedy, teacher_forced_logits

from garagelm.runtime.generate import Engine
from garagelm.runtime.load import load_model
from garagelm.runtime.sampling import SamplingParams


def measure(path: str) -> dict:
    from llama_cpp import Llama

    loaded = load_model(path)
    ref = Llama(path, n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    rows, agree, total, maxdiff, meandiff = [], 0, 0, 0.0, []
    for text, chat in [(p, False) for p in RAW_PROMPTS] + [(p, True) for p in CHAT_PROMPTS]:
        ids = _prompt_ids(loaded, text, chat)
        ours = list(
            Engine(loaded.model, loaded.tokenizer, 1024).tokens(
                ids, SamplingParams(temperature=0, max_tokens=64)
            )
        )
        theirs = _ref_greedy(ref, ids, 64, loaded.tokenizer.eog_ids)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        got, expected = teacher_forced_logits(loaded, ref, ids)
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(expected)
        d = np.abs(got - expected)
        maxdiff = max(maxdiff, float(d.max()))
        meandiff.append(float(d.mean()))
        rows.append({"prompt": text, "chat": chat, "equal_prefix": same, "of": len(theirs)})
    return {
        "file": path,
        "greedy": rows,
        "top1_agreement": agree / total,
        "positions": total,
        "logit_max_abs_diff": maxdiff,
        "logit_mean_abs_diff": float(np.mean(meandiff)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = [measure(f) for f in args.files]
    for r in results:
        print(f"\n{r['file']}")
        for row in r["greedy"]:
            kind = "chat" if row["chat"] else "raw "
            print(
                f"  {kind} {row['prompt'][:45]:45s} greedy tokens equal: {row['equal_prefix']:2d}/{row['of']}"
            )
        print(f"  top-1 agreement {r['top1_agreement']:.4f} over {r['positions']} positions; "
              f"logits |diff| max {r['logit_max_abs_diff']:.4f} mean {r['logit_mean_abs_diff']:.5f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
