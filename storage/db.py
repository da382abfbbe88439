"""The DuckDB side: schema, run and model lineage, the transactional shard loader, read-only SQL.

The writer opens the database only for short transactions, so analysts can query between loads.
A shard is loaded in one transaction that replaces the rows of the documents it covers and records
the shard as loaded; loading the same shard again changes nothing.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from .schema import DDL
from .staging import read_manifest, remove_shard


class DatabaseBusy(Exception):
    """Another process holds the DuckDB file; transient, worth retrying."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def connect(path: str, read_only: bool = False, wait_seconds: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with backoff while another process holds its lock."""
    if not read_only:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                if "lock" in str(exc).lower():
                    raise DatabaseBusy(f"{path}: locked by another process for over {wait_seconds:.0f} s") from exc
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def ensure_schema(database: str) -> None:
    con = connect(database)
    try:
        for ddl in DDL:
            con.execute(ddl)
    finally:
        con.close()


def start_run(database: str, run_id: str, config_path: str | None, corpus: str) -> None:
    ensure_schema(database)
    con = connect(database)
    try:
        con.execute("INSERT INTO runs (run_id, started_at, status, config_path, corpus) VALUES (?, ?, 'running', ?, ?)",
                    [run_id, _now(), config_path, corpus])
    finally:
        con.close()


def finish_run(database: str, run_id: str, status: str, docs_read: int, docs_failed: int,
               file_errors: Sequence[str], error: str | None = None) -> None:
    con = connect(database)
    try:
        con.execute("UPDATE runs SET finished_at = ?, status = ?, docs_read = ?, docs_failed = ?, file_errors = ?, "
                    "error = ? WHERE run_id = ?",
                    [_now(), status, docs_read, docs_failed, list(file_errors), error, run_id])
    finally:
        con.close()


def register_model(database: str, model: dict[str, Any]) -> None:
    con = connect(database)
    try:
        con.execute(
            "INSERT INTO models (model_id, head, task, source, revision, resolved_revision, weights_sha256, params, "
            "dtype, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_id) DO NOTHING",
            [model["model_id"], model["head"], model["task"], model["source"], model.get("revision"),
             model.get("resolved_revision"), model.get("weights_sha256"), json.dumps(model.get("params", {})),
             model.get("dtype"), _now()])
    finally:
        con.close()


def load_shard(database: str, manifest_path: str) -> tuple[int, int]:
    """Load one staged shard in one transaction; returns (result rows, failed rows) loaded."""
    manifest, results, failed = read_manifest(manifest_path)
    table, head = manifest["table"], manifest["head"]
    covered = pa.table({"doc_id": pa.array(manifest["covered_doc_ids"], pa.string())})
    con = connect(database)
    try:
        if con.execute("SELECT 1 FROM loaded_shards WHERE shard_id = ?", [manifest["shard_id"]]).fetchone():
            con.close()
            remove_shard(manifest_path)  # loaded before (a retry after a crash): nothing to do
            return 0, 0
        con.register("staged_results", results)
        con.register("staged_failed", failed)
        con.register("staged_covered", covered)
        con.execute("BEGIN TRANSACTION")
        try:
            for target in (table, "failed_docs"):
                con.execute(f"DELETE FROM {target} WHERE head = ? AND doc_id IN (SELECT doc_id FROM staged_covered)",
                            [head])
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM staged_results")
            con.execute("INSERT INTO failed_docs BY NAME SELECT * FROM staged_failed")
            con.execute("INSERT INTO loaded_shards VALUES (?, ?, ?, ?, ?, ?)",
                        [manifest["shard_id"], manifest["run_id"], head, results.num_rows, failed.num_rows, _now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    remove_shard(manifest_path)
    return results.num_rows, failed.num_rows


def query(database: str, sql: str, params: Sequence[Any] | None = None, wait_seconds: float = 30.0):
    """Run one read-only query; returns (column names, rows)."""
    con = connect(database, read_only=True, wait_seconds=wait_seconds)
    try:
        cur = con.execute(sql, list(params or []))
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()
