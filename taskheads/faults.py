"""Test-only fault injection: kill the process at a named point to prove crash safety.

Set TASKHEADS_KILL_AT="point:n" (e.g. "staged:2") and the n-th time the run reaches `point`
the process gets SIGKILL, like a power cut: no cleanup, no exception handlers. Points:
infer (results computed, nothing staged), staged (package on disk, not loaded),
load (inside the load transaction, before COMMIT), loaded (committed, package not yet removed).
Unset (always, outside tests) it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def checkpoint(point: str) -> None:
    spec = os.environ.get("TASKHEADS_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _seen[point] += 1
    if _seen[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
