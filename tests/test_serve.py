"""`garage serve` driven by the real `openai` and `ollama` client libraries, over real HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from conftest import SERVE_CTX as CTX
from conftest import SERVE_KEY as KEY
from conftest import serve_dir

from garagelm.runtime.generate import Completion, Engine
from garagelm.runtime.load import load_model
from garagelm.runtime.sampling import SamplingParams
from garagelm.serve.app import Server
from garagelm.serve.models import ModelPool

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def alone(smol_path):
    """Greedy replies computed directly with the engine, one request at a time: the reference
    the server's (concurrent) answers must equal."""
    loaded = load_model(smol_path)
    engine = Engine(loaded.model, loaded.tokenizer, CTX, stepwise_prefill=True)  # as a server slot
    template = loaded.chat_template()

    def reply(messages, max_tokens, stop=()):
        ids = loaded.encode_chat(template, messages)
        c = Completion()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(stop))
        text = "".join(engine.complete(ids, params, c))
        return text, c

    return reply


@pytest.fixture()
def oai(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(text):
    return [{"role": "user", "content": text}]


def test_chat_equals_the_engine_alone(oai, alone):
    r = oai.chat.completions.create(
        model=MODEL, messages=ask("What is the capital of France?"), temperature=0, max_tokens=24
    )
    text, c = alone(ask("What is the capital of France?"), 24)
    assert r.choices[0].message.content == text and text.strip()
    assert r.choices[0].finish_reason == ("length" if c.finish_reason == "length" else "stop")
    assert (
        r.usage.completion_tokens == c.stats.generated_tokens
        and r.usage.prompt_tokens == c.stats.prompt_tokens
    )


def test_streaming_with_usage(oai, alone):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=ask("Name three colours."), temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    ref, c = alone(ask("Name three colours."), 20)
    assert text == ref
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"] and c.finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stop_sequences_are_never_emitted(oai, alone):
    full, _ = alone(ask("Count from one to ten in words."), 40)
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    r = oai.chat.completions.create(
        model=MODEL,
        messages=ask("Count from one to ten in words."),
        temperature=0,
        max_tokens=40,
        stop=[stop, "zzz"],
    )
    out = r.choices[0].message.content
    assert stop not in out and full.startswith(out) and r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_distribution(oai, smol_path):
    import torch

    from garagelm.quant.ggml_linear import exact_products

    r = oai.chat.completions.create(
        model=MODEL, messages=ask("Hi!"), temperature=0, max_tokens=5, logprobs=True, top_logprobs=20
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 20 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token
    # The first token's distribution computed here, outside the server.
    loaded = load_model(smol_path)
    ids = loaded.encode_chat(loaded.chat_template(), ask("Hi!"))
    engine = Engine(loaded.model, loaded.tokenizer, CTX, stepwise_prefill=True)  # as a server slot
    lp = torch.log_softmax(engine.prefill(ids, Completion().stats).float(), -1)
    best = torch.topk(lp, 20)
    # the same arithmetic whatever prefix the slot reused: equal up to the log-softmax's rounding
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-5)
    with exact_products():  # and near the float32 model's distribution: int8 activations, as
        # llama.cpp computes (the output head's too), moved these 20 log-probabilities by 0.21
        exact = torch.log_softmax(Engine(loaded.model, loaded.tokenizer, CTX)._forward(ids, 0).float(), -1)
    assert torch.topk(exact, 20).values.tolist() == pytest.approx(best.values.tolist(), abs=0.5)
    assert int(exact.argmax()) == int(best.indices[0])
    tok = loaded.tokenizer.token_bytes[int(best.indices[0])]
    assert bytes(content[0].bytes) == tok


def test_legacy_completions_and_n(oai):
    r = oai.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, n=2, logprobs=3
    )
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text and r.choices[0].text
    assert len(r.choices[0].logprobs.tokens) == 8 and all(
        len(t) == 3 for t in r.choices[0].logprobs.top_logprobs
    )
    seeded = [
        oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=7, temperature=1.0)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]  # a seed makes sampling repeatable


def test_concurrent_streams_equal_each_alone(oai, alone):
    prompts = ["Tell me about cats.", "What is 2+2?", "Write a haiku about rain.", "Why is the sky blue?"]

    def run(p):
        stream = oai.chat.completions.create(
            model=MODEL, messages=ask(p), temperature=0, max_tokens=24, stream=True
        )
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(run, prompts))
    assert got == [alone(ask(p), 24)[0] for p in prompts]


def test_bad_requests(oai, served):
    import openai

    url = served[0]
    with pytest.raises(openai.NotFoundError, match="not found"):
        oai.chat.completions.create(model="nope:1b", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="'temperature' must be float"):
        oai.chat.completions.create(model=MODEL, messages=ask("hi"), temperature="hot")
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' must be between 0 and 20"):
        oai.chat.completions.create(model=MODEL, messages=ask("hi"), logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match=r"invalid JSON schema|cannot be used"):
        oai.chat.completions.create(
            model=MODEL,
            messages=ask("hi"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=ask("word " * 600))
    assert e.value.code == "context_length_exceeded" and f"holds {CTX} tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        oai.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=CTX)
    bad = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(
        url + "/v1/chat/completions", content=b" " * (5 << 20), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert big.status_code == 413
    from openai import OpenAI

    for key in ("wrong", None):
        client = OpenAI(base_url=url + "/v1", api_key=key or "x", max_retries=0)
        if key is None:
            assert httpx.get(url + "/v1/models").status_code == 401
            assert httpx.get(url + "/api/tags").json()["error"].startswith("missing or wrong API key")
        else:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()


def test_client_that_disconnects_frees_its_slot(served, oai):
    url, pool = served
    body = {
        "model": MODEL,
        "messages": ask("Write a long story about a dragon."),
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    held = pool.held["smollm2:135m"]
    for _ in range(100):
        if held.scheduler.busy == 0:
            break
        time.sleep(0.05)
    assert held.scheduler.busy == 0  # cancelled long before its 400 tokens
    r = oai.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None


def test_ollama_client(served, alone):
    import ollama

    url, pool = served
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    ref, c = alone(ask("What is the capital of France?"), 16)
    r = client.chat(
        model=MODEL,
        messages=ask("What is the capital of France?"),
        options={"temperature": 0, "num_predict": 16},
    )
    assert r.message.content == ref and r.done and r.eval_count == c.stats.generated_tokens
    parts = list(
        client.chat(
            model=MODEL,
            messages=ask("What is the capital of France?"),
            stream=True,
            options={"temperature": 0, "num_predict": 16},
        )
    )
    assert (
        "".join(p.message.content for p in parts) == ref
        and parts[-1].done
        and parts[-1].done_reason == c.finish_reason
    )
    g = client.generate(
        model=MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 8}
    )
    assert g.response and g.done
    assert MODEL in [m.model for m in client.list().models]
    assert client.show(MODEL).details.family == "llama"
    assert [m.model for m in client.ps().models] == [MODEL]
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.chat(model="nope:1b", messages=ask("hi"))
    assert httpx.get(url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    client.generate(model=MODEL, prompt="", keep_alive=0)  # Ollama's way to unload now
    assert client.ps().models == [] and pool.held == {}


def test_keep_alive_expires(served):
    import ollama

    url, pool = served
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    client.generate(model=MODEL, prompt="Hi", raw=True, keep_alive="1s", options={"num_predict": 2})
    assert [m.model for m in client.ps().models] == [MODEL]
    for _ in range(60):
        if not pool.held:
            break
        time.sleep(0.1)
    assert pool.held == {}  # the reaper unloaded it after its keep-alive


def test_garage_ps_cli(served, capsys):
    from garagelm.cli import main

    url, _ = served
    assert main(["ps", "--server", url, "--api-key", KEY]) == 0
    assert "NAME" in capsys.readouterr().out
    assert main(["ps", "--server", "http://127.0.0.1:9"]) == 1
    assert "no garage server" in capsys.readouterr().err


def test_cors_closed_unless_asked():
    from starlette.testclient import TestClient

    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(Server(ModelPool()).app(), base_url="http://127.0.0.1:11435")
    assert "access-control-allow-origin" not in closed.options("/v1/chat/completions", headers=pre).headers
    opened = TestClient(
        Server(ModelPool(), cors_origins=["https://app.example"]).app(), base_url="http://127.0.0.1:11435"
    )
    ok = opened.options("/v1/chat/completions", headers={**pre, "Origin": "https://app.example"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in opened.options("/v1/chat/completions", headers=pre).headers


def test_cross_site_and_rebinding_requests_are_refused():
    """A web page elsewhere cannot make the server work (a "simple" POST needs no preflight), and
    a DNS-rebinding name is not served; the page's own origin and plain clients are."""
    from starlette.testclient import TestClient

    client = TestClient(Server(ModelPool()).app(), base_url="http://127.0.0.1:11435")
    body = b'{"model": "x", "messages": []}'
    evil = client.post(
        "/api/chat", content=body, headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}
    )
    assert evil.status_code == 403 and "--cors-origin https://evil.example" in evil.json()["error"]
    assert client.get("/api/version", headers={"Origin": "http://127.0.0.1:11435"}).status_code == 200
    assert client.get("/api/version").status_code == 200
    rebound = client.get("/api/version", headers={"Host": "attacker.example:11435"})
    assert rebound.status_code == 403 and "127.0.0.1 and localhost only" in rebound.json()["error"]
    exposed = TestClient(
        Server(ModelPool(), api_key="k", local_only=False).app(), base_url="http://192.168.1.5:11435"
    )
    assert exposed.get("/api/version", headers={"Authorization": "Bearer k"}).status_code == 200


def test_api_refuses_pulls_by_url_and_bad_bias(served):
    url = served[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/api/pull", json={"model": "https://example.com/x.gguf"}, headers=auth)
    assert r.status_code == 400 and "catalog models only" in r.json()["error"]
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 2, "logit_bias": {"999999": 5}}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 2, "seed": 2**70}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=auth).status_code == 400


def test_page_is_self_contained(served):
    page = httpx.get(served[0] + "/")  # no key needed: the page holds no data
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from outside


def test_serve_warns_when_exposed(capsys, monkeypatch):
    import uvicorn

    from garagelm.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # the listening itself is tested above
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    assert "without --api-key" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert "without --api-key" not in capsys.readouterr().err


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("prompt", ["Describe a person as JSON.", "Tell me a joke.", "Who was Ada Lovelace?"])
def test_json_schema_output_parses_and_validates(oai, prompt):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = oai.chat.completions.create(
        model=MODEL, messages=ask(prompt), response_format=fmt, max_tokens=120, seed=1
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_streamed_and_ollama_format(oai, served):
    import ollama

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=ask("List two fruits."),
            response_format={"type": "json_object"},
            max_tokens=100,
            temperature=0,  # sampled, this small model can run a string past max_tokens
            stream=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "stop"
    ]
    assert isinstance(json.loads(text), dict)
    client = ollama.Client(host=served[0], headers={"Authorization": f"Bearer {KEY}"})
    r = client.chat(
        model=MODEL,
        messages=ask("Describe a person."),
        format=PERSON,
        options={"num_predict": 120, "seed": 3},
    )
    import jsonschema

    jsonschema.validate(json.loads(r.message.content), PERSON)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_tool_calls(oai):
    import jsonschema
    import openai

    q = ask("What is the weather in Paris?")
    r = oai.chat.completions.create(
        model=MODEL, messages=q, tools=[WEATHER], tool_choice="required", max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the result goes back; with "auto" the model may answer or call again, and either parses
    follow = [
        *q,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    r2 = oai.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=80)
    m2 = r2.choices[0].message
    assert (m2.content is not None) != bool(m2.tool_calls) and r2.choices[0].finish_reason in (
        "stop",
        "tool_calls",
    )
    stream = oai.chat.completions.create(  # greedy: sampled, the city was at times ""
        model=MODEL, messages=q, tools=[WEATHER], max_tokens=80, stream=True, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    chunks = list(stream)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["city"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"
    ]
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        oai.chat.completions.create(
            model=MODEL,
            messages=q,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_api_pull_streams_progress(served, tmp_path, monkeypatch):
    import hashlib

    import ollama

    payload = bytes(range(256)) * 8192  # 2 MiB
    files = tmp_path / "files"
    files.mkdir()
    (files / "tiny.gguf").write_bytes(payload)

    http_server = serve_dir(files)
    entry = {
        "file": "tiny.gguf", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
        "architecture": "llama", "quantization": "Q4_0",
        "sources": [{"type": "url", "url": f"http://127.0.0.1:{http_server.server_port}/tiny.gguf"}],
    }  # fmt: skip
    (tmp_path / "catalog.json").write_text(json.dumps({"tiny:test": entry}))
    monkeypatch.setenv("GARAGE_CATALOG", str(tmp_path / "catalog.json"))
    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    try:
        client = ollama.Client(host=served[0], headers={"Authorization": f"Bearer {KEY}"})
        events = list(client.pull("tiny:test", stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling tiny:test" and statuses[-1] == "success"
        progress = [e for e in events if e.status.startswith("downloading")]
        assert progress and progress[-1].completed == progress[-1].total == len(payload)
        assert "verifying sha256 digest" in statuses
        assert "tiny:test" in [m.model for m in client.list().models]
        with pytest.raises(ollama.ResponseError, match="not in the model catalog"):
            client.pull("nothing:here", stream=False)
    finally:
        http_server.shutdown()


def test_run_through_the_server(served, alone, capsys):
    from garagelm.cli import main

    url = served[0]
    ref, _ = alone(ask("What is the capital of France?"), 16)
    args = [
        "run",
        MODEL,
        "What is the capital of France?",
        "--server",
        url,
        "--api-key",
        KEY,
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == ref.strip()
    assert main(["run", MODEL, "hi", "--server", url]) == 1  # no key
    assert "missing or wrong API key" in capsys.readouterr().err


def test_models_load_only_when_memory_allows(served, oai, monkeypatch):
    import openai

    from garagelm.store import hardware

    pool = served[1]
    pool.unload(MODEL)
    real = hardware.detect()
    monkeypatch.setattr(
        hardware, "detect", lambda with_gpu=True: hardware.Hardware(real.total_ram, 100 * 2**20, 2, [], [])
    )
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2)
    assert e.value.status_code == 503 and "GiB is free" in str(e.value)
    monkeypatch.setattr(hardware, "detect", lambda with_gpu=True: real)
    assert oai.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2).choices


def test_least_recently_used_idle_model_makes_room(smol_path, tmp_path, monkeypatch):
    from garagelm.store.importer import import_file

    monkeypatch.setenv("GARAGE_HOME", str(tmp_path / "home"))
    for name in ("a:1", "b:1"):
        import_file(smol_path, name, quiet=True)
    pool = ModelPool(ctx_size=128, slots=1, max_loaded=1)
    pool.get("a:1")
    pool.get("b:1")
    assert list(pool.held) == ["b:1"]  # a:1 was idle, so it gave way
    pool.close()
