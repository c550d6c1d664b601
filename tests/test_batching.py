"""Continuous batching: sequences stepped together give exactly what each gives alone."""

from __future__ import annotations

import threading

import pytest
import torch

from garagelm.runtime.batching import Request, Scheduler
from garagelm.runtime.generate import Completion, Engine
from garagelm.runtime.load import load_model
from garagelm.runtime.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village",
    "1, 2, 3,",
]


@pytest.fixture(scope="module")
def loaded(smol_path):
    return load_model(smol_path)


def _greedy_alone(loaded, text: str, n: int, kv: str = "f16") -> tuple[list[int], list[torch.Tensor]]:
    e = Engine(loaded.model, loaded.tokenizer, 256, kv_dtype=kv)
    ids = loaded.tokenizer.encode(text, add_special=True)
    logits = e._forward(ids, 0)
    toks, rows = [], []
    for _ in range(n):
        tok = int(logits.argmax())
        toks.append(tok)
        logits = e._forward([tok], len(e.cached))
        rows.append(logits)
    return toks, rows


@torch.inference_mode()
@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_batched_step_is_bit_identical_to_single_steps(loaded, kv):
    assert loaded.model.__dict__.get("decode_plan") is not None  # the kernel path is what is tested
    engines = [Engine(loaded.model, loaded.tokenizer, 256, kv_dtype=kv) for _ in PROMPTS]
    last = []
    for e, text in zip(engines, PROMPTS):  # prompts of different lengths: different positions
        ids = loaded.tokenizer.encode(text, add_special=True)
        last.append(int(e._forward(ids, 0).argmax()))
    got_toks = [[t] for t in last]
    got_rows: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for _ in range(12):
        out = loaded.model.decode_batch(last, [e.cache for e in engines], [len(e.cached) for e in engines])
        for i, (e, row) in enumerate(zip(engines, out)):
            e.cached.append(last[i])
            got_rows[i].append(row)
        last = [int(r.argmax()) for r in out]
        for i, t in enumerate(last):
            got_toks[i].append(t)
    for i, text in enumerate(PROMPTS):
        toks, rows = _greedy_alone(loaded, text, 12, kv)
        assert got_toks[i][:12] == toks
        for a, b in zip(got_rows[i], rows):
            assert torch.equal(a, b)


def test_scheduler_queues_past_its_slots_and_cancels(loaded):
    sched = Scheduler(loaded.model, loaded.tokenizer, 256, slots=2)
    done, texts = [], {}
    lock = threading.Lock()

    def events(i):
        def on(kind, payload):
            with lock:
                if kind == "text":
                    texts[i] = texts.get(i, "") + payload[0]
                elif kind in ("done", "error"):
                    done.append((i, kind, payload))

        return on

    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [loaded.tokenizer.encode(p, add_special=True) for p in PROMPTS]
    reqs = [sched.submit(Request(p, params, events(i))) for i, p in enumerate(prompts)]
    reqs[3].cancel()  # waiting behind the two slots: never runs
    for _ in range(600):
        with lock:
            if len(done) == 3:
                break
        threading.Event().wait(0.05)
    sched.close()
    assert sorted(i for i, kind, _ in done) == [0, 1, 2] and all(kind == "done" for _, kind, _ in done)
    for i in range(3):
        c = Completion()
        e = Engine(loaded.model, loaded.tokenizer, 256, stepwise_prefill=True)  # as a slot
        assert texts.get(i, "") == "".join(e.complete(prompts[i], params, c))
    assert len(sched.engines) == 2 and 3 not in texts


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_stepwise_prefill_does_not_depend_on_what_was_reused(loaded, kv):
    """A server slot's prompt goes through the decode step, so a position's keys, values and
    logits are the same bits whether it came in one prompt, after a reused prefix, or as a
    decoded token that a later prompt reuses."""
    tok = loaded.tokenizer
    prompt = tok.encode("The quick brown fox jumps over the lazy dog, and then it", add_special=True)

    def slot():
        return Engine(loaded.model, tok, 256, kv_dtype=kv, stepwise_prefill=True)

    whole = slot()
    want = whole.prefill(prompt, Completion().stats)
    split = slot()  # a shorter prompt first, then the whole one reusing it
    split.prefill(prompt[:7], Completion().stats)
    c = Completion()
    assert torch.equal(split.prefill(prompt, c.stats), want) and c.stats.cached_tokens == 7
    # a reply's decoded tokens reused by the next prompt, against a fresh slot
    reply = list(Engine.tokens(split, prompt, SamplingParams(temperature=0, max_tokens=6)))
    follow = prompt + reply[:-1] + tok.encode(" again", add_special=False)
    c = Completion()
    got = split.prefill(follow, c.stats)
    assert c.stats.cached_tokens == len(prompt) + len(reply) - 1
    assert torch.equal(got, slot().prefill(follow, Completion().stats))


def test_prompts_join_the_running_steps_and_replies_equal_each_alone(loaded, monkeypatch):
    """A request that arrives while others decode has its prompt computed in the same steps as
    their tokens (chunked prefill: the rows left in a step), and every reply is still the one
    its request gets alone."""
    tok, model = loaded.tokenizer, loaded.model
    steps = []  # per decode_batch call: how many rows each cache had
    real = model.decode_batch

    def spy(ids, caches, positions, rows_out=None):
        steps.append([sum(c is d for d in caches) for c in dict.fromkeys(caches)])
        return real(ids, caches, positions, rows_out=rows_out)

    monkeypatch.setattr(model, "decode_batch", spy)
    sched = Scheduler(model, tok, 256, slots=3)
    params = SamplingParams(temperature=0, max_tokens=16)
    prompts = [tok.encode(p, add_special=True) for p in PROMPTS[:3]]
    texts, finished = ["", "", ""], threading.Semaphore(0)
    first_tokens = threading.Event()

    def events(i):
        def on(kind, payload):
            if kind == "text":
                texts[i] += payload[0]
                if i == 0 and len(texts[0]) > 8:
                    first_tokens.set()
            elif kind in ("done", "error"):
                assert kind == "done", payload
                finished.release()

        return on

    sched.submit(Request(prompts[0], params, events(0)))
    assert first_tokens.wait(60)  # the first request is decoding ...
    sched.submit(Request(prompts[1], params, events(1)))  # ... when two more arrive
    sched.submit(Request(prompts[2], params, events(2)))
    for _ in range(3):
        assert finished.acquire(timeout=60)
    sched.close()
    monkeypatch.undo()
    # some step carried one decoding row and several prompt rows of another sequence
    assert any(1 in rows and max(rows) > 1 for rows in steps)
    for i in range(3):
        alone = Engine(model, tok, 256, stepwise_prefill=True)  # as a slot, by itself
        assert texts[i] == "".join(alone.complete(prompts[i], params, Completion()))
