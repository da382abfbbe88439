"""The DuckDB side: schema, run and model lineage, the transactional shard loader, read-only SQL.

The writer opens the database only for short transactions, so analysts can query between loads.
A shard is loaded in one transaction that replaces the rows of the documents it covers and records
the shard as loaded; loading the same shard again changes nothing.
"""
from __future__ import annotations

import fcntl
import json
import logging
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb

from core.errors import DatabaseBusy, SchemaTooNew
from core.faults import checkpoint
from core.tables import ResultTable

from . import migrations
from .schema import META_TABLE
from .migrations import MigrationError  # noqa: F401  (raised from here)
from .staging import BadPackage, clear_staging, quarantine, read_manifest, remove_shard, staged_manifests

_log = logging.getLogger("taskheads.storage")

# New database files are written in DuckDB's v1 storage format, which DuckDB 1.x and 2.x both read
# and write (2.x's own format cannot be opened by 1.x); an existing file keeps its format.
STORAGE_COMPATIBILITY = "v1.0.0"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def connect(path: str, read_only: bool = False, wait_seconds: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with backoff while another process holds its lock.

    A database newer than this code (schema version or DuckDB storage format) raises SchemaTooNew.
    """
    config = {}
    if not read_only:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if not Path(path).exists():
            config = {"storage_compatibility_version": STORAGE_COMPATIBILITY}
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(path, read_only=read_only, config=config)
            break
        except duckdb.IOException as exc:
            if "created with an newer version" in str(exc) or "created with a newer version" in str(exc):
                raise SchemaTooNew(f"{path}: written by a newer DuckDB than this one ({duckdb.__version__}) "
                                   "can read; upgrade taskheads to use it") from None
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                if "lock" in str(exc).lower():
                    raise DatabaseBusy(f"{path}: locked by another process for over {wait_seconds:.0f} s") from exc
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        migrations.refuse_newer(con, path)
    except BaseException:
        con.close()
        raise
    return con


def ensure_schema(database: str, *, tables: Sequence[ResultTable]) -> None:
    """Create the schema, or migrate an older database to this code's version in one transaction; the
    result tables are the heads' declarations (heads.registry.result_tables())."""
    con = connect(database)
    try:
        migrations.migrate(con, database, tables)
    finally:
        con.close()


def check_database(database: str) -> None:
    """Raise SchemaTooNew for a database this code must not touch; nothing for a missing one, or one
    busy right now (the run checks again when it opens it)."""
    if not Path(database).exists():
        return
    try:
        connect(database, read_only=True, wait_seconds=0).close()
    except DatabaseBusy:
        pass


def database_id(database: str) -> str:
    """The UUID the database got when it was created (or migrated to a versioned schema)."""
    if not Path(database).exists():
        raise FileNotFoundError(f"{database}: no such database (its id names its staging folder)")
    con = connect(database)
    try:
        found = migrations.database_id(con)
    finally:
        con.close()
    if not found:
        raise MigrationError(f"{database}: has no database id yet (open it for writing once to migrate it)")
    return found


def start_run(database: str, run_id: str, config_path: str | None, corpus: str, *,
              tables: Sequence[ResultTable]) -> None:
    ensure_schema(database, tables=tables)
    con = connect(database)
    try:
        con.execute("INSERT INTO runs (run_id, started_at, status, config_path, corpus) VALUES (?, ?, 'running', ?, ?)",
                    [run_id, _now(), config_path, corpus])
    finally:
        con.close()


def finish_run(database: str, run_id: str, status: str, docs_read: int, head_stats: dict[str, dict],
               file_errors: Sequence[str], error: str | None = None) -> None:
    totals = {k: sum(h.get(k, 0) for h in head_stats.values())
              for k in ("inferred", "unchanged", "skipped_failed", "failed")}
    con = connect(database)
    try:
        con.execute("UPDATE runs SET finished_at = ?, status = ?, docs_read = ?, docs_inferred = ?, docs_skipped = ?, "
                    "docs_failed = ?, head_stats = ?, file_errors = ?, error = ? WHERE run_id = ?",
                    [_now(), status, docs_read, totals["inferred"], totals["unchanged"] + totals["skipped_failed"], totals["failed"],
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


def recover(database: str, run_id: str, staging: str | None = None, log: Callable[[str], Any] | None = None, *,
            tables: Sequence[ResultTable]) -> int:
    """Finish what a killed run left: load its complete packages, drop partial files, mark it.

    Called under `run_lock`, so every other staging folder belongs to a dead run. A package that can
    never load is quarantined (recorded in this run's row), so it never blocks this or a later run.
    """
    loaded = 0
    for manifest in staged_manifests(database, staging):
        if Path(manifest).parent.name != run_id:
            loaded += load_or_quarantine(database, manifest, run_id, log, tables=tables)[0]
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


def last_throughput(database: str) -> dict[str, float]:
    """Documents per second each head inferred in the most recent run where it inferred any (from
    runs.head_stats: inferred / seconds), read-only; {} without a database."""
    if not Path(database).exists():
        return {}
    con = connect(database, read_only=True)
    try:
        rows = con.execute("SELECT head_stats FROM runs WHERE head_stats IS NOT NULL "
                           "ORDER BY started_at DESC LIMIT 200").fetchall()
    finally:
        con.close()
    rates: dict[str, float] = {}
    for (stats,) in rows:
        try:
            heads = json.loads(stats)
        except ValueError:
            continue
        for head, h in (heads.items() if isinstance(heads, dict) else ()):
            if head not in rates and isinstance(h, dict) and h.get("inferred") and h.get("seconds"):
                rates[head] = float(h["inferred"]) / float(h["seconds"])
    return rates


def map_legacy_model(database: str, model: dict[str, Any], *, tables: Sequence[ResultTable]) -> int:
    """Give the rows stored under the model's version-1 id (`legacy_model_id`, recorded in `models` by a
    run before identity version 2) its current id, once, in one transaction: the same files made them,
    so they are not inferred again and the latest views keep them. Returns the doc_state rows mapped.

    The mapping is recorded in taskheads_meta (`legacy_model:<old id>` = new id), so later runs skip it
    and a later change of the model (another new id) does not inherit the old rows."""
    legacy, new, head = model.get("legacy_model_id"), model["model_id"], model["head"]
    if not legacy or legacy == new:
        return 0
    con = connect(database)
    try:
        key = f"legacy_model:{legacy}"
        if con.execute(f"SELECT 1 FROM {META_TABLE} WHERE key = ?", [key]).fetchone():
            return 0
        if not con.execute("SELECT 1 FROM models WHERE model_id = ? AND head = ?", [legacy, head]).fetchone():
            return 0
        present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                             "current_database() AND schema_name = 'main'").fetchall()}
        con.execute("BEGIN TRANSACTION")
        (mapped,) = con.execute("SELECT count(*) FROM doc_state WHERE head = ? AND model_id = ?",
                                [head, legacy]).fetchone()
        for table in ["doc_state", "failed_docs", "evaluations", *sorted({t.name for t in tables})]:
            if table in present:
                con.execute(f"UPDATE {table} SET model_id = ? WHERE head = ? AND model_id = ?", [new, head, legacy])
        con.execute(f"INSERT OR REPLACE INTO {META_TABLE} (key, value) VALUES (?, ?)", [key, new])
        con.execute("COMMIT")
        return mapped
    finally:
        con.close()


def record_evaluations(database: str, rows: Sequence[dict], *, tables: Sequence[ResultTable]) -> None:
    """Store metrics: {head, model_id, metric, value, n, source, run_id}; replaces the same key."""
    ensure_schema(database, tables=tables)
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


def load_shard(database: str, manifest_path: str, *, tables: Sequence[ResultTable]) -> tuple[int, int]:
    """Load one staged package in one transaction; returns (result rows, failed rows) loaded.

    Documents that succeeded replace their earlier rows, failures and `doc_state`. A failed attempt
    deletes nothing and leaves `doc_state` (the last success) alone: it only replaces the document's
    `failed_docs` row, counting `attempts` up while text and model stay the same. The package is
    recorded in `loaded_shards`; a package already recorded is skipped, so loading twice (a retry, a
    recovery after a crash) changes nothing. `tables`: the result tables a package may name.
    """
    manifest, parts = read_manifest(manifest_path, tables)
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
            done = "SELECT doc_id FROM staged_covered WHERE status = 'done'"
            # attempts in a row on the same text and model: the previous failure's count + 1
            con.execute(
                "CREATE OR REPLACE TEMP TABLE new_failed AS SELECT s.* REPLACE ("
                "  CASE WHEN p.doc_id IS NOT NULL AND p.fingerprint IS NOT DISTINCT FROM s.fingerprint "
                "  AND p.model_id = s.model_id THEN p.attempts + 1 ELSE 1 END::INTEGER AS attempts) "
                "FROM staged_failed s LEFT JOIN (SELECT doc_id, fingerprint, model_id, coalesce(max(attempts), 1) "
                "  AS attempts FROM failed_docs WHERE head = ? AND stage <> 'plan' AND doc_id IS NOT NULL "
                "  GROUP BY ALL) p ON p.doc_id = s.doc_id AND s.stage <> 'plan'", [head])
            con.execute(f"DELETE FROM {table} WHERE head = ? AND doc_id IN ({done})", [head])
            con.execute("DELETE FROM failed_docs f WHERE head = ? AND (doc_id IN (SELECT doc_id FROM staged_covered) "
                        "OR EXISTS (SELECT 1 FROM staged_failed s WHERE s.source_file = f.source_file "
                        "AND s.source_row = f.source_row))", [head])
            con.execute(f"DELETE FROM doc_state WHERE head = ? AND doc_id IN ({done})", [head])
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM staged_results")
            con.execute("INSERT INTO failed_docs BY NAME SELECT * FROM new_failed")
            con.execute("INSERT INTO doc_state SELECT ?, doc_id, fingerprint, ?, ?, status, ? FROM staged_covered "
                        "WHERE status = 'done'", [head, manifest["model_id"], manifest["run_id"], _now()])
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


# what DuckDB says when a package's rows do not fit the tables: the package is at fault, not the moment
_UNLOADABLE = (duckdb.BinderException, duckdb.ConversionException, duckdb.CatalogException,
               duckdb.TypeMismatchException)


def load_or_quarantine(database: str, manifest_path: str, run_id: str | None = None,
                       log: Callable[[str], Any] | None = None, *,
                       tables: Sequence[ResultTable]) -> tuple[int, int, str | None]:
    """`load_shard`, except that a package that can never load is quarantined: moved to
    `<staging root>/quarantine/<shard>/` with its reason, recorded in `runs.quarantined` of `run_id`
    (default: the run whose folder holds the package) and logged. Returns (result rows, failed rows,
    the quarantine entry or None). Transient errors (busy database, I/O) are raised, not quarantined."""
    try:
        return (*load_shard(database, manifest_path, tables=tables), None)
    except BadPackage as exc:
        reason = str(exc)
    except _UNLOADABLE as exc:
        reason = f"does not load: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    entry = f"{Path(manifest_path).name.removesuffix('.json')}: {reason}"
    run = run_id or Path(manifest_path).parent.name
    con = connect(database)  # first the record (idempotent), then the move: a retry repeats neither
    try:
        con.execute("UPDATE runs SET quarantined = CASE WHEN list_contains(coalesce(quarantined, []), $1) "
                    "THEN quarantined ELSE list_append(coalesce(quarantined, []), $1) END WHERE run_id = $2",
                    [entry, run])
    finally:
        con.close()
    dest = quarantine(manifest_path, reason)
    (log or _log.error)(f"load package quarantined, never to be loaded: {entry} (moved to {dest})")
    return 0, 0, entry


def quarantined(database: str, run_id: str) -> list[str]:
    """The load packages a run quarantined: "<shard>: <reason>"."""
    row = query(database, "SELECT quarantined FROM runs WHERE run_id = ?", [run_id])[1]
    return list(row[0][0] or []) if row else []


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
