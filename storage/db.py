"""The DuckDB side: schema, run and model lineage, the transactional shard loader, read-only SQL.

The writer opens the database only for short transactions, so analysts can query between loads.
A shard is loaded in one transaction that replaces the rows of the documents it covers and records
the shard as loaded; loading the same shard again changes nothing.
"""
from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import duckdb

from .schema import DDL
from .views import create_views
from taskheads.faults import checkpoint

from .staging import clear_staging, read_manifest, remove_shard, staged_manifests


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
        create_views(con)
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


def finish_run(database: str, run_id: str, status: str, docs_read: int, head_stats: dict[str, dict],
               file_errors: Sequence[str], error: str | None = None) -> None:
    totals = {k: sum(h.get(k, 0) for h in head_stats.values()) for k in ("inferred", "unchanged", "failed")}
    con = connect(database)
    try:
        con.execute("UPDATE runs SET finished_at = ?, status = ?, docs_read = ?, docs_inferred = ?, docs_skipped = ?, "
                    "docs_failed = ?, head_stats = ?, file_errors = ?, error = ? WHERE run_id = ?",
                    [_now(), status, docs_read, totals["inferred"], totals["unchanged"], totals["failed"],
                     json.dumps(head_stats), list(file_errors), error, run_id])
    finally:
        con.close()


@contextmanager
def run_lock(database: str):
    """One writing run per database at a time; the OS drops the lock if the process dies."""
    path = Path(database).with_name(Path(database).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseBusy(f"{database}: another taskheads run is writing to it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover(database: str, run_id: str, staging: str | None = None) -> int:
    """Finish what a killed run left: load its complete packages, drop partial files, mark it.

    Called under `run_lock`, so every other staging folder belongs to a dead run.
    """
    loaded = 0
    for manifest in staged_manifests(database, staging):
        if Path(manifest).parent.name != run_id:
            loaded += load_shard(database, manifest)[0]
    clear_staging(database, keep_run=run_id, staging=staging)
    con = connect(database)
    try:
        con.execute("UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, ?) "
                    "WHERE status = 'running' AND run_id <> ?", [_now(), run_id])
    finally:
        con.close()
    return loaded


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


def record_evaluations(database: str, rows: Sequence[dict]) -> None:
    """Store metrics: {head, model_id, metric, value, n, source, run_id}; replaces the same key."""
    ensure_schema(database)
    con = connect(database)
    try:
        con.execute("BEGIN TRANSACTION")
        for r in rows:
            con.execute("DELETE FROM evaluations WHERE head = ? AND model_id = ? AND metric = ? AND source = ? "
                        "AND run_id IS NOT DISTINCT FROM ?",
                        [r["head"], r["model_id"], r["metric"], r["source"], r.get("run_id")])
            con.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [r["head"], r["model_id"], r["metric"], float(r["value"]), int(r["n"]), r["source"],
                         r.get("run_id"), _now()])
        con.execute("COMMIT")
    finally:
        con.close()


def load_shard(database: str, manifest_path: str) -> tuple[int, int]:
    """Load one staged package in one transaction; returns (result rows, failed rows) loaded.

    The transaction replaces the rows of the documents the package covers (results, failures and
    `doc_state`) and records the package in `loaded_shards`; a package already recorded is skipped,
    so loading twice (a retry, a recovery after a crash) changes nothing.
    """
    manifest, parts = read_manifest(manifest_path)
    table, head = manifest["table"], manifest["head"]
    con = connect(database)
    try:
        if con.execute("SELECT 1 FROM loaded_shards WHERE shard_id = ?", [manifest["shard_id"]]).fetchone():
            con.close()
            remove_shard(manifest_path)  # loaded before (a retry after a crash): nothing to do
            return 0, 0
        for part, data in parts.items():
            con.register(f"staged_{part}", data)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"DELETE FROM {table} WHERE head = ? AND doc_id IN (SELECT doc_id FROM staged_covered)",
                        [head])
            con.execute("DELETE FROM failed_docs f WHERE head = ? AND (doc_id IN (SELECT doc_id FROM staged_covered) "
                        "OR EXISTS (SELECT 1 FROM staged_failed s WHERE s.source_file = f.source_file "
                        "AND s.source_row = f.source_row))", [head])
            con.execute("DELETE FROM doc_state WHERE head = ? AND doc_id IN (SELECT doc_id FROM staged_covered)",
                        [head])
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM staged_results")
            con.execute("INSERT INTO failed_docs BY NAME SELECT * FROM staged_failed")
            con.execute("INSERT INTO doc_state SELECT ?, doc_id, fingerprint, ?, ?, status, ? FROM staged_covered",
                        [head, manifest["model_id"], manifest["run_id"], _now()])
            con.execute("INSERT INTO loaded_shards VALUES (?, ?, ?, ?, ?, ?)",
                        [manifest["shard_id"], manifest["run_id"], head, parts["results"].num_rows,
                         parts["failed"].num_rows, _now()])
            checkpoint("load")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    checkpoint("loaded")
    remove_shard(manifest_path)
    return parts["results"].num_rows, parts["failed"].num_rows


def query(database: str, sql: str, params: Sequence[Any] | None = None, wait_seconds: float = 30.0,
          read: Sequence[str] = ()):
    """Run one SELECT on the database opened read-only; returns (column names, rows).

    Sandboxed (storage.sandbox): anything but one SELECT is refused (UnsafeSQL) before the database is
    opened, and the query can open no file but the database and the files or folders in `read`."""
    from .sandbox import check_select, lock_down

    check_select(sql)
    con = connect(database, read_only=True, wait_seconds=wait_seconds)
    try:
        lock_down(con, [p for p in read if not Path(p).is_dir()], [p for p in read if Path(p).is_dir()], utc=False)
        cur = con.execute(sql, list(params or []))
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()
