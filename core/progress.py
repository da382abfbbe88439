"""Progress events from the corpus flow to whoever listens (the CLI's progress bars).

The flow emits; it never knows whether a terminal is attached. Served or deployed runs have no
listener, so emitting costs nothing there.
"""
from __future__ import annotations

from typing import Callable

Listener = Callable[[str, dict], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(event: str, **info) -> None:
    """`head_planned` (head, units, docs) | `unit_done` (head, docs, failed)."""
    for listener in list(_listeners):
        try:
            listener(event, info)
        except Exception:  # a broken display never stops a run
            pass
