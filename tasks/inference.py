"""Prefect task: run one head over one work unit and stage the rows as a load package."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.engine import pipe
from heads.loading import cached_head
from storage.corpus import Unit, read_unit
from storage.staging import stage_shard


@dataclass(frozen=True)
class UnitOutcome:
    manifest: str
    head: str
    routed: int  # documents routed to the head (valid or not)
    done: int
    failed: int
    rows_read: int


def shard_id_for(run_id: str, head: str, unit: Unit) -> str:
    digest = hashlib.sha1(f"{unit.path}:{unit.start}:{unit.stop}".encode()).hexdigest()[:12]
    return f"{run_id}-{head}-{digest}"


@task(name="infer-unit", cache_policy=NO_CACHE)
def infer_unit(unit: Unit, head_cfg, id_column: str, text_column: str, run_id: str, model_id: str,
               staging: str) -> UnitOutcome:
    head = cached_head(head_cfg)
    data = read_unit(unit, id_column, text_column, head.needed_columns(), {head_cfg.name: head_cfg.where})
    docs = [data.docs[i] for i in data.routes[head_cfg.name]]
    lineage = {"head": head_cfg.name, "run_id": run_id, "model_id": model_id}
    source = Path(unit.path).name
    rows, failed = [], []
    for item in data.invalid:
        if head_cfg.name in item["heads"]:
            failed.append({**lineage, "doc_id": item["doc_id"], "error": item["error"], "stage": "read",
                           "source_file": source})
    read_failures = len(failed)
    for res in pipe(head, docs, token_budget=head_cfg.batch_tokens):
        if res.error is not None:
            failed.append({**lineage, "doc_id": res.doc.doc_id, "error": res.error, "stage": res.stage,
                           "source_file": source})
        else:
            rows.extend({**row, **lineage, "doc_id": res.doc.doc_id} for row in res.rows)
    covered = sorted({d.doc_id for d in docs} | {f["doc_id"] for f in failed if f["doc_id"] is not None})
    manifest = stage_shard(Path(staging), shard_id_for(run_id, head_cfg.name, unit), head_cfg.name, head.table,
                           rows, failed, covered, run_id)
    infer_failures = len(failed) - read_failures
    return UnitOutcome(manifest=manifest, head=head_cfg.name, routed=len(docs) + read_failures,
                       done=len(docs) - infer_failures, failed=len(failed), rows_read=data.rows_read)
