"""Load packages: each (unit, head) result is staged as Parquet files plus a manifest.

Files are written under a temporary name and renamed into place (atomic on one filesystem); the
manifest is written last, so a manifest on disk always names complete files. The loader only
ever reads manifests, which makes staging safe to interrupt at any point.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import arrow_schema


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def staging_dir(database: str, run_id: str) -> Path:
    d = Path(database).with_name(Path(database).name + ".staging") / run_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def stage_shard(directory: Path, shard_id: str, head: str, table: str, rows: Sequence[dict],
                failed: Sequence[dict], covered_doc_ids: Sequence[str], run_id: str) -> str:
    """Write one load package; returns the manifest path."""
    directory = Path(directory)
    results_path = directory / f"{shard_id}.results.parquet"
    failed_path = directory / f"{shard_id}.failed.parquet"
    _atomic_write_parquet(pa.Table.from_pylist(list(rows), schema=arrow_schema(table)), results_path)
    _atomic_write_parquet(pa.Table.from_pylist(list(failed), schema=arrow_schema("failed_docs")), failed_path)
    manifest = {
        "shard_id": shard_id, "run_id": run_id, "head": head, "table": table,
        "results": results_path.name, "failed": failed_path.name,
        "covered_doc_ids": list(covered_doc_ids),
        "result_rows": len(rows), "failed_rows": len(failed),
    }
    path = directory / f"{shard_id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def read_manifest(path: str) -> tuple[dict, pa.Table, pa.Table]:
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    base = Path(path).parent
    return manifest, pq.read_table(base / manifest["results"]), pq.read_table(base / manifest["failed"])


def remove_shard(path: str) -> None:
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    base = Path(path).parent
    for name in (manifest["results"], manifest["failed"]):
        (base / name).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)
