"""Prefect task: run one head over one work unit and stage the rows as a load package."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections import Counter
import socket
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.engine import pipe
from heads.loading import using_head
from storage.corpus import read_docs
from storage.plan import WorkUnit
from storage.staging import stage_shard
from core.faults import checkpoint
from core.memory import keep_memory_flat


@dataclass(frozen=True)
class UnitOutcome:
    manifest: str
    head: str
    inferred: int  # documents run through the model (done or failed there)
    done: int
    failed: int  # failures of any stage: plan (duplicate id), read, encode, forward, decode
    worker: str = ""  # host:pid that ran the unit
    model_failed: int = 0  # documents of `inferred` that failed (encode, forward, decode)
    reasons: tuple[tuple[str, int], ...] = ()  # the most common model-stage failure reasons, with counts
    loaded_rows: int | None = None  # result rows this task committed itself (a lake), None: left to the loader


def shard_id_for(run_id: str, head: str, unit: WorkUnit) -> str:
    key = f"{unit.path}:{unit.rows}:{unit.refused}"
    return f"{run_id}-{head}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


# Every unit's task run carries this tag: `prefect concurrency-limit create taskheads-infer K` caps how
# many units run at once across all workers (each running unit holds one model in memory).
INFER_TAG = "taskheads-infer"


# errors of shared storage and networks that pass: a stale NFS handle, an I/O error, a timeout, a reset
TRANSIENT_ERRNOS = {errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EAGAIN,
                    errno.EBUSY, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPIPE}


def infrastructure_fault(exc: BaseException) -> bool:
    """A fault of the machine the unit ran on, not of the unit: worth running the unit again.

    A lost connection (Dask's CommClosedError, ConnectionError, TimeoutError) or an OSError with a
    transient errno. Document faults never get here (the engine records them per document); a bug
    or a broken model (any other exception) must fail the unit at once, not three times."""
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ == "CommClosedError":
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _retry_unit(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return infrastructure_fault(exc)
    return False


# A Dask worker that dies mid-unit takes Prefect's task engine with it: Dask itself runs the unit again on
# another worker (its `allowed-failures`, 3). These retries cover the infrastructure faults that reach the
# task: the shared corpus or staging filesystem failing for a moment, a dropped connection.
@task(name="infer-unit", cache_policy=NO_CACHE, tags=[INFER_TAG], retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_retry_unit)
def infer_unit(unit: WorkUnit, head_cfg, id_column: str, text_column: str, run_id: str, model_id: str,
               staging: str, max_resident_models: int = 0, lake: str | None = None) -> UnitOutcome:
    """`lake`: the results lake (storage.lake), into which this task commits its own package once staged,
    so the flow's one loader is no ceiling when units run on many workers; it only sweeps what is left."""
    keep_memory_flat()  # a Dask worker's process too
    with using_head(head_cfg, max_resident_models) as head:
        out = _infer(head, unit, head_cfg, id_column, text_column, run_id, model_id, staging)
    if lake:
        out = _commit(out, lake)
    return out


def _commit(out: UnitOutcome, lake: str) -> UnitOutcome:
    """Load the unit's package into the lake here; on any error it stays staged for the flow's loader
    (which retries, or quarantines a package that can never load, and reports it)."""
    from dataclasses import replace

    from heads.registry import result_tables
    from storage.db import load_shard

    try:
        rows, _ = load_shard(lake, out.manifest, tables=result_tables())
    except Exception as exc:  # noqa: BLE001 - the loader decides what the error means
        logging.getLogger("taskheads.inference").warning(f"package {Path(out.manifest).name} left to the run's "
                                                         f"loader: {type(exc).__name__}: {exc}")
        return out
    return replace(out, loaded_rows=rows)


def _infer(head, unit: WorkUnit, head_cfg, id_column: str, text_column: str, run_id: str, model_id: str,
           staging: str) -> UnitOutcome:
    lineage = {"head": head_cfg.name, "run_id": run_id, "model_id": model_id}
    fingerprint = dict(zip(unit.rows, unit.fingerprints))
    docs, invalid = read_docs(unit.path, unit.rows, id_column, text_column, head.needed_columns())
    source_file = unit.source or unit.path

    failed = [{**lineage, "doc_id": doc_id, "error": reason, "stage": "plan", "source_file": source_file,
               "source_row": row, "kind": "terminal"} for row, doc_id, reason in unit.refused]
    failed += [{**lineage, "doc_id": bad["doc_id"], "error": bad["error"], "stage": "read", "kind": "terminal",
                "fingerprint": fingerprint[bad["row"]], "source_file": source_file,
                "source_row": unit.source_row(bad["row"])} for bad in invalid]
    covered = [{"doc_id": bad["doc_id"], "fingerprint": fingerprint[bad["row"]], "status": "failed"}
               for bad in invalid if bad["doc_id"] is not None]
    rows = []
    results = pipe(head, [doc for _, doc in docs], token_budget=head_cfg.batch_tokens)
    for (row, doc), res in zip(docs, results):
        if res.error is not None:
            failed.append({**lineage, "doc_id": doc.doc_id, "error": res.error, "stage": res.stage,
                           "kind": res.kind, "fingerprint": fingerprint[row], "source_file": source_file,
                           "source_row": unit.source_row(row)})
        else:
            rows.extend({**r, **lineage, "doc_id": doc.doc_id} for r in res.rows)
        covered.append({"doc_id": doc.doc_id, "fingerprint": fingerprint[row],
                        "status": "failed" if res.error else "done"})
    checkpoint("infer")
    manifest = stage_shard(Path(staging), shard_id_for(run_id, head_cfg.name, unit), head_cfg.name, head.result_table,
                           model_id, rows, failed, covered, run_id, unit.replaces, unit.planned_after, unit.plan_id,
                           unit.planned_snapshot)
    checkpoint("staged")
    reasons = Counter(r.error for r in results if r.error is not None)
    return UnitOutcome(manifest=manifest, head=head_cfg.name, inferred=len(docs),
                       done=len(docs) - sum(reasons.values()), failed=len(failed),
                       worker=f"{socket.gethostname()}:{os.getpid()}", model_failed=sum(reasons.values()),
                       reasons=tuple(reasons.most_common(3)))
