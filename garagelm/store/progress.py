"""Progress of a pull for whoever listens (the server's /api/pull stream); the terminal has tqdm.

A listener is set for the current context (a thread, or a task), so concurrent pulls report to
their own requests.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

Listener = Callable[[str, "int | None", "int | None"], None]
_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "garage_pull_progress", default=None
)


def report(status: str, completed: int | None = None, total: int | None = None) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(status, completed, total)


@contextlib.contextmanager
def listening(listener: Listener):
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
