"""Reasoning models: <think>...</think> apart from the answer (run, the OpenAI and Ollama shapes)
and the DeepSeek-R1 distill chat template."""

from __future__ import annotations

import asyncio
import io

import pytest

from garagelm.cli.run import ReplyWriter
from garagelm.runtime.chat_template import ChatTemplate
from garagelm.runtime.generate import Completion
from garagelm.runtime.thinking import ThinkingSplitter, split_reply, starts_thinking

R1_REPLY = "Okay, the user asks 2+2.\nThat is 4.\n</think>\n\nThe answer is **4**."
QWEN3_REPLY = "<think>\nShort thought.\n</think>\n\nHello!"

# A DeepSeek-R1 distill chat template, written after the one DeepSeek-R1-Distill-Qwen ships in
# its tokenizer_config.json (MIT licence): BOS, system prompt, <｜User｜>/<｜Assistant｜> turns,
# earlier thinking cut from assistant turns, tool calls, and "<think>\n" opening the reply.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def _stream(text: str, inside: bool, cut: int):
    s = ThinkingSplitter(inside)
    parts = [p for i in range(0, len(text), cut) for p in s.feed(text[i : i + cut])] + s.flush()
    return "".join(t for k, t in parts if k == "thinking"), "".join(t for k, t in parts if k == "answer")


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11, 100])
def test_split_whatever_the_pieces(cut):
    assert _stream(R1_REPLY, True, cut) == ("Okay, the user asks 2+2.\nThat is 4.\n", "The answer is **4**.")
    assert _stream(QWEN3_REPLY, False, cut) == ("Short thought.\n", "Hello!")
    assert _stream("No thinking <think> here.", False, cut) == ("", "No thinking <think> here.")
    assert split_reply(R1_REPLY, True) == ("Okay, the user asks 2+2.\nThat is 4.", "The answer is **4**.")


def test_r1_distill_template_renders_as_transformers_does():
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    ours = ChatTemplate(R1_TEMPLATE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>").render(messages)
    ref, _ = render_jinja_template(
        conversations=[messages], chat_template=R1_TEMPLATE, add_generation_prompt=True,
        bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
    )  # fmt: skip
    assert ours == ref[0]
    assert "add" not in ours  # earlier thinking is not sent back
    assert starts_thinking(ours)


def test_run_shows_thinking_apart_or_hides_it():
    shown = io.StringIO()
    w = ReplyWriter(shown, inside=True)
    for i in range(0, len(R1_REPLY), 4):
        w.write("answer", R1_REPLY[i : i + 4])
    assert w.close() == "The answer is **4**."
    assert (
        shown.getvalue()
        == "Thinking...\nOkay, the user asks 2+2.\nThat is 4.\n\n...done thinking.\n\nThe answer is **4**.\n"
    )
    hidden = io.StringIO()
    w = ReplyWriter(hidden, inside=True, hide=True)
    w.write("answer", R1_REPLY)
    assert w.close() == "The answer is **4**." and hidden.getvalue() == "The answer is **4**.\n"


def _events(text: str):
    async def job():
        for i in range(0, len(text), 3):
            yield 0, "text", (text[i : i + 3], [])
        c = Completion(text=text, finish_reason="stop")
        c.stats.generated_tokens = 9
        yield 0, "done", c

    return job()


def test_openai_shape_returns_reasoning_content():
    from garagelm.serve.openai_api import _Shape

    shape = _Shape(True, None, {"id": "x", "created": 0, "model": "m", "system_fingerprint": None})
    shape.thinking = True
    whole = asyncio.run(shape.whole(_events(R1_REPLY), 5, 1))
    message = whole["choices"][0]["message"]
    assert message["content"] == "The answer is **4**."
    assert message["reasoning_content"] == "Okay, the user asks 2+2.\nThat is 4."

    async def collect():
        return [chunk async for chunk in shape.sse(_events(R1_REPLY), 5, 1, False)]

    import json

    deltas = [
        json.loads(c[6:])["choices"][0]["delta"] for c in asyncio.run(collect()) if c != "data: [DONE]\n\n"
    ]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Okay, the user asks 2+2.\nThat is 4.\n"
    assert "".join(d.get("content", "") for d in deltas) == "The answer is **4**."


def test_streamed_logprobs_are_sent_once_when_thinking_is_split():
    import json

    from garagelm.serve.openai_api import _Shape

    class Tok:  # token id -> bytes, all the shape needs for logprobs
        token_bytes = (b"<think>", b"a", b"</think>", b"b")

    async def job():
        for tid, piece in enumerate(["<think>", "a", "</think>", "b"]):
            yield 0, "text", (piece, [(tid, -0.5, [])])
        c = Completion(text="<think>a</think>b", finish_reason="stop")
        yield 0, "done", c

    shape = _Shape(True, Tok(), {"id": "x", "created": 0, "model": "m", "system_fingerprint": None})
    shape.thinking = False

    async def collect():
        return [c async for c in shape.sse(job(), 1, 1, False)]

    chunks = [json.loads(c[6:]) for c in asyncio.run(collect()) if c != "data: [DONE]\n\n"]
    tokens = [
        e["token"] for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    assert tokens == ["<think>", "a", "</think>", "b"]  # each once, none lost to a held-back tag
