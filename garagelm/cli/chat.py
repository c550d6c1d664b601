"""The interactive chat loop, with Ollama's slash commands and multi-line input."""

from __future__ import annotations

import sys

HELP = """Commands:
  /set temperature 0.2   change a sampling setting (temperature, top_p, top_k, min_p,
                         repeat_penalty, seed, max_tokens)
  /system TEXT           set the system message (clears the conversation)
  /clear                 forget the conversation
  /bye                   exit (also Ctrl-D)
  /help                  this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply."""

_SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "seed": int,
    "max_tokens": int,
}


def _read_message(prompt: str) -> str | None:
    """One user message; None at end of input. \"\"\" opens and closes a multi-line block."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    if lines[0].endswith('"""') and len(lines[0]) >= 3:
        return lines[0][:-3]
    while True:
        try:
            nxt = input("... ")
        except EOFError:
            break
        if nxt.rstrip().endswith('"""'):
            lines.append(nxt.rstrip()[:-3])
            break
        lines.append(nxt)
    return "\n".join(lines).strip("\n")


def _command(session, text: str) -> bool:
    """Handle a slash command; False means exit."""
    cmd, _, rest = text.partition(" ")
    rest = rest.strip()
    if cmd in ("/bye", "/exit", "/quit"):
        return False
    if cmd == "/clear":
        session.clear()
        print("Cleared the conversation.")
    elif cmd == "/system":
        session.system = rest or None
        session.messages.clear()
        print("Set system message." if rest else "Removed the system message.")
    elif cmd == "/set":
        key, _, value = rest.partition(" ")
        key = key.replace("-", "_")
        if key not in _SETTABLE or not value.strip():
            print(f"usage: /set NAME VALUE, NAME one of {', '.join(_SETTABLE)}")
        else:
            try:
                setattr(session.params, key, _SETTABLE[key](value.strip()))
                print(f"Set {key} to {value.strip()}.")
            except ValueError:
                print(f"{key} needs a {_SETTABLE[key].__name__}, got {value.strip()!r}")
    elif cmd in ("/help", "/?"):
        print(HELP)
    else:
        print(f"Unknown command {cmd}; /help lists them.")
    return True


def repl(session) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    interactive = sys.stdin.isatty()
    if interactive:
        print(f'{session.title}: type a message, /help for commands, """ for multi-line.')
    prompt = ">>> " if interactive else ""
    while True:
        try:
            text = _read_message(prompt)
        except KeyboardInterrupt:
            print("\nUse Ctrl-D or /bye to exit.")
            continue
        if text is None:
            if interactive:
                print()
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            if not _command(session, text.strip()):
                return 0
            continue
        session.reply(text)
