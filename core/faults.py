"""Test-only fault injection: prove crash safety and the handling of failed documents.

TASKHEADS_KILL_AT="point:n" (e.g. "staged:2"): the n-th time the run reaches `point` the process gets
SIGKILL, like a power cut: no cleanup, no exception handlers. With TASKHEADS_KILL_ONCE=PATH only the
first process to get there dies (it creates PATH): a lost Dask worker whose unit runs again elsewhere. Points: infer (results computed,
nothing staged), staged (package on disk, not loaded), claimed (a lake load: its claim updated inside the
load transaction, nothing else written yet), load (inside the load transaction, before COMMIT), loaded
(committed, package not yet removed).

TASKHEADS_PAUSE_AT="point:seconds": sleep there instead (two loaders of one package overlapping).

TASKHEADS_FAIL_DOCS="head:id1,id2[:kind]" (`*` for every document; several specs separated by `;`):
a batch of that head holding one of those documents fails in forward. kind `transient` (default)
raises an out-of-memory error, so the engine's real back-off path isolates the document and records
a transient failure; `terminal` raises a DocumentError.

Unset (always, outside tests) each costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Iterable

_seen: Counter = Counter()


def checkpoint(point: str) -> None:
    pause = os.environ.get("TASKHEADS_PAUSE_AT")
    if pause and pause.partition(":")[0] == point:
        import time

        time.sleep(float(pause.partition(":")[2] or 1))
    spec = os.environ.get("TASKHEADS_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _seen[point] += 1
    if _seen[point] == int(nth or 1):
        once = os.environ.get("TASKHEADS_KILL_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def injected_failure(head: str, doc_ids: Iterable[str]) -> str | None:
    """The kind of fault ('transient' or 'terminal') injected for a batch of `head` holding `doc_ids`."""
    spec = os.environ.get("TASKHEADS_FAIL_DOCS")
    if not spec:
        return None
    for part in spec.split(";"):
        name, _, rest = part.partition(":")
        ids, _, kind = rest.partition(":")
        if name != head:
            continue
        wanted = set(ids.split(","))
        if "*" in wanted or wanted.intersection(doc_ids):
            return kind or "transient"
    return None
