"""Reasoning models (DeepSeek-R1 and its distills, Qwen3): `<think>...</think>` kept apart
from the answer, as text streams in.

R1 distill templates end the prompt with "<think>\\n", so the reply starts inside the
thinking and only the closing tag appears; other models write both tags.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def starts_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt already opened the thinking block for the reply."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ThinkingSplitter:
    """feed(piece) -> [(kind, text)], kind "thinking" or "answer"; a tag split across pieces is
    held back until it is complete, and the newlines around the tags are dropped."""

    def __init__(self, inside: bool = False):
        self.inside = inside
        self.seen_tag = inside  # only a reply's first tag counts
        self._held = ""
        self._strip_lead = inside

    def feed(self, piece: str) -> list[tuple[str, str]]:
        text, out = self._held + piece, []
        self._held = ""
        while text:
            tag = CLOSE if self.inside else (OPEN if not self.seen_tag else None)
            if tag is None:
                self._emit(out, "answer", text)
                break
            at = text.find(tag)
            if at < 0:
                keep = _partial_suffix(text, tag)
                if not self.inside and not self.seen_tag and text[: len(text) - keep].strip():
                    self.seen_tag = True  # the reply began with an answer: no thinking block
                    self._emit(out, "answer", text)
                    break
                self._held = text[len(text) - keep :]
                self._emit(out, self._kind(), text[: len(text) - keep])
                break
            if tag == OPEN and text[:at].strip():  # an opening tag counts only at the start
                self.seen_tag = True
                self._emit(out, "answer", text)
                break
            self._emit(out, self._kind(), text[:at])
            text = text[at + len(tag) :]
            self.inside, self.seen_tag, self._strip_lead = not self.inside, True, True
        return out

    def flush(self) -> list[tuple[str, str]]:
        held, self._held, out = self._held, "", []
        self._emit(out, self._kind(), held)
        return out

    def _kind(self) -> str:
        return "thinking" if self.inside else "answer"

    def _emit(self, out: list, kind: str, text: str) -> None:
        if self._strip_lead:  # the newlines right after a tag belong to the tag
            text = text.lstrip("\n")
            if text:
                self._strip_lead = False
        if text:
            out.append((kind, text))


def split_reply(text: str, inside: bool = False) -> tuple[str, str]:
    """(thinking, answer) of a whole reply."""
    s = ThinkingSplitter(inside)
    parts = s.feed(text) + s.flush()
    thinking = "".join(t for k, t in parts if k == "thinking").rstrip("\n")
    return thinking, "".join(t for k, t in parts if k == "answer")


def _partial_suffix(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
