"""Tool (function) calling for any chat model, in llama.cpp's "generic" way.

The tools are described in the system prompt and the reply is constrained (llguidance) to one
JSON object: {"tool_call": {"name": ..., "arguments": {...}}} or, when the model may answer
instead, {"response": "..."}. The arguments follow each function's parameter schema, so a
call always parses. Models with their own tool-call syntax in their template still get this
format: it works the same on every model, small ones included.
"""

from __future__ import annotations

import json
from typing import Any

from garagelm.errors import GarageError


def check_tools(tools: Any) -> list[dict]:
    """The function specs of an OpenAI `tools` list; GarageError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise GarageError("'tools' must be a non-empty list")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GarageError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise GarageError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"name": fn["name"], "description": str(fn.get("description", "")), "parameters": params})
    return out


def choose(functions: list[dict], tool_choice: Any) -> tuple[list[dict], bool]:
    """(functions the model may call, whether it must call one) for an OpenAI tool_choice."""
    if tool_choice in (None, "auto"):
        return functions, False
    if tool_choice == "required":
        return functions, True
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        picked = [f for f in functions if f["name"] == name]
        if not picked:
            raise GarageError(f"tool_choice names {name!r}, which is not in 'tools'")
        return picked, True
    raise GarageError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def reply_schema(functions: list[dict], required: bool) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    call = {
        "type": "object",
        "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
        "required": ["tool_call"],
        "additionalProperties": False,
    }
    if required:
        return call
    answer = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [call, answer]}


def system_prompt(functions: list[dict], required: bool) -> str:
    specs = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    how = 'Reply with JSON: {"tool_call": {"name": <function name>, "arguments": <arguments>}}'
    if not required:
        how += ' to call a function, or {"response": <your answer>} to answer directly'
    return f"You can call these functions:\n{specs}\n{how}."


def prepare_messages(
    messages: list[dict], functions: list[dict], required: bool, tool_role: bool
) -> list[dict]:
    """The conversation with the tool instructions in the system message; earlier calls and
    their results written the way the model is asked to write them."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            fn = calls[0].get("function", {})
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                pass
            m["content"] = json.dumps({"tool_call": {"name": fn.get("name"), "arguments": args}})
        elif m["role"] == "tool" and not tool_role:  # templates without a tool role
            m = {"role": "user", "content": f"Function result: {m.get('content', '')}"}
        out.append(m)
    prompt = system_prompt(functions, required)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_reply(text: str) -> tuple[str | None, dict | None]:
    """(answer text, tool call {"name", "arguments" (JSON text)}) from a constrained reply."""
    try:
        data = json.loads(text)
    except ValueError:
        return text, None  # cut short (max_tokens): give what came
    if isinstance(data, dict) and isinstance(data.get("tool_call"), dict):
        call = data["tool_call"]
        return None, {"name": call.get("name"), "arguments": json.dumps(call.get("arguments", {}))}
    if isinstance(data, dict) and "response" in data:
        return str(data["response"]), None
    return text, None
