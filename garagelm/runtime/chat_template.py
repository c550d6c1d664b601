"""Chat templates (the model's own Jinja template) rendered in jinja2's sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from garagelm.errors import GarageError


class TemplateError(GarageError):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"chat template refused the conversation: {message}")


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    # Hugging Face templates expect non-ASCII kept as is (Jinja's own tojson escapes it).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same environment settings as transformers' apply_chat_template, so whitespace matches.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


class ChatTemplate:
    """Renders a list of {"role", "content"} messages into the prompt text the model was trained on."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = _compile(source)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        from jinja2.exceptions import SecurityError, UndefinedError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
                **extra,
            )
        except SecurityError as e:
            raise TemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
        except (UndefinedError, TypeError) as e:
            raise TemplateError(f"chat template failed: {e}") from None
