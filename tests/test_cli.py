"""`garage run` / `garage chat` end to end on the real model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from garagelm.cli import main
from garagelm.runtime.generate import Completion, Engine
from garagelm.runtime.sampling import SamplingParams

GREEDY = ["--temperature", "0"]


def _garage(*args, input=None, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "garagelm", *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _expected_reply(loaded, user, max_tokens, kv=None):
    text = loaded.chat_template().render([{"role": "user", "content": user}])
    ids = loaded.tokenizer.encode(text, add_special=True, parse_special=True)
    c = Completion()
    "".join(
        Engine(loaded.model, loaded.tokenizer, 4096, kv_dtype=kv).complete(
            ids, SamplingParams(temperature=0, max_tokens=max_tokens), c
        )
    )
    return c.text


def test_run_prompt_greedy_is_the_engines_reply(smol_path, smol_loaded, capsys):
    q = "What is the capital of France? Answer in one sentence."
    assert main(["run", str(smol_path), q, *GREEDY, "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == _expected_reply(smol_loaded, q, 24).strip()
    assert "Paris" in out


def test_run_with_a_q8_0_kv_cache(smol_path, smol_loaded, capsys):
    q = "Name three colours."
    assert main(["run", str(smol_path), q, *GREEDY, "--max-tokens", "40", "--kv-cache", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == _expected_reply(smol_loaded, q, 40, "q8_0").strip()


def test_run_makes_no_network_access(smol_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert main(["run", str(smol_path), "Say hi.", *GREEDY, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def test_store_name_and_offline(smol_path, monkeypatch, capsys):
    home = smol_path.parents[3]
    monkeypatch.setenv("GARAGE_HOME", str(home))
    monkeypatch.setenv("GARAGE_OFFLINE", "1")
    assert main(["run", "smollm2:135m", "Say hi.", *GREEDY, "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.setenv("GARAGE_HOME", str(home / "empty"))
    assert main(["run", "smollm2:135m", "hi"]) == 1
    assert "garage pull smollm2:135m" in capsys.readouterr().err


def test_stdin_prompt_verbose_and_stop(smol_path):
    proc = _garage(
        "run", str(smol_path), *GREEDY, "--max-tokens", "40", "--verbose", "--stop", "Paris",
        input="What is the capital of France? Answer in one sentence.",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "Paris" not in proc.stdout
    for field in ("prompt eval rate:", "eval rate:", "time to first token:", "load duration:"):
        assert field in proc.stderr


def test_raw_mode_matches_engine(smol_loaded, smol_path, capsys):
    assert (
        main(["run", str(smol_path), "--raw", "The capital of France is", *GREEDY, "--max-tokens", "6"]) == 0
    )
    ids = smol_loaded.tokenizer.encode("The capital of France is", add_special=True)
    c = Completion()
    "".join(
        Engine(smol_loaded.model, smol_loaded.tokenizer, 64).complete(
            ids, SamplingParams(temperature=0, max_tokens=6), c
        )
    )
    assert capsys.readouterr().out.strip() == c.text.strip()


def test_seeded_sampling_is_reproducible(smol_path, capsys):
    args = [
        "run",
        str(smol_path),
        "Tell me a joke.",
        "--seed",
        "7",
        "--temperature",
        "1.0",
        "--max-tokens",
        "20",
    ]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_chat_keeps_conversation_and_commands(smol_path):
    script = "\n".join(
        [
            "/set temperature 0",
            "/set max_tokens 30",
            "My name is Ada. Reply with one short sentence.",
            '"""',
            "What is my name?",
            'Answer with just the name."""',
            "/system You are a pirate.",
            "Hello",
            "/clear",
            "/set nonsense 1",
            "/bye",
            "this must never be sent",
        ]
    )
    proc = _garage("chat", str(smol_path), input=script + "\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Set temperature to 0." in out and "Set max_tokens to 30." in out
    assert "Ada" in out.split("Set max_tokens to 30.")[1]  # the second turn saw the first
    assert "Set system message." in out and "Cleared the conversation." in out
    assert "usage: /set NAME VALUE" in out


def test_chat_prompt_contains_history(smol_path):
    from argparse import Namespace

    from garagelm.cli.run import Session

    args = Namespace(
        model=str(smol_path), raw=False, system="Be brief.", template=None, verbose=False, ctx_size=512, kv_cache=None,
        temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=None, max_tokens=8, stop=[],
    )  # fmt: skip
    s = Session(args)
    with open(os.devnull, "w") as sink:
        first = s.reply("Remember the word pineapple.", out=sink)
    text = s.loaded.tokenizer.decode(s.prompt_ids("What word?"), special=True)
    assert "Be brief." in text and "pineapple" in text and first.strip() in text
    assert s.engine.cached, "the cache keeps the conversation for the next turn"


def test_ctrl_c_stops_reply_not_session(smol_path):
    proc = subprocess.Popen(
        # greedy: a reply known to run to the 2000-token limit, so Ctrl-C always lands inside it
        [sys.executable, "-m", "garagelm", "chat", str(smol_path), "--max-tokens", "2000", "--temperature", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a terminal's Ctrl-C, even when this test runs in a background job that ignores SIGINT
        # (a child would inherit that, and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    proc.stdin.write(b"Write a very long story about a dragon.\n")
    proc.stdin.flush()
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    seen, deadline = b"", time.time() + 120
    while len(seen) < 40 and time.time() < deadline:
        try:
            seen += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.1)
    assert len(seen) >= 40, "the reply never streamed"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    os.set_blocking(fd, True)
    rest_out, err = proc.communicate(b"/set temperature 0.5\n/bye\n", timeout=120)
    assert proc.returncode == 0, err
    assert b"[reply stopped]" in err
    assert b"Set temperature to 0.5." in rest_out


def test_missing_template_is_a_clear_error(smol_loaded):
    from garagelm.errors import GarageError

    saved = smol_loaded.template_source
    smol_loaded.template_source = None
    try:
        with pytest.raises(GarageError, match=r"no chat template.*--raw.*--template"):
            smol_loaded.chat_template()
    finally:
        smol_loaded.template_source = saved


def test_template_override_file(smol_path, tmp_path, capsys):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %} Answer:")
    assert main(["run", str(smol_path), "2+2=", "--template", str(tpl), *GREEDY, "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_flags_are_one_line_errors(smol_path):
    proc = _garage("run", str(smol_path), "hi", "--temperature", "-1")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --temperature must be >= 0"
    proc = _garage("run", "no-such-model:1b", "hi")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
