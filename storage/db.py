"""The DuckDB side: schema, run and model lineage, the transactional shard loader, read-only SQL.

The writer opens the database only for short transactions, so analysts can query between loads.
A shard is loaded in one transaction that replaces the rows of the documents it covers and records
the shard as loaded; loading the same shard again changes nothing.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import pyarrow as pa

from core.errors import DatabaseBusy, DatabaseLocked, SchemaTooNew
from core.faults import checkpoint
from core.tables import ResultTable

from . import lake, migrations
from .sandbox import sql_string
from .schema import META_TABLE
from .migrations import MigrationError  # noqa: F401  (raised from here)
from .staging import (BadPackage, clear_staging, quarantine, read_manifest, read_op, remove_shard, stage_op,
                      staged_manifests, staged_ops, staging_dir)

_log = logging.getLogger("taskheads.storage")

# New database files are written in DuckDB's v1.4.0 storage format, which DuckDB 1.4 and later (2.x too)
# read and write (2.x's own format cannot be opened by 1.x); an existing file keeps its format. Against v1.0.0
# it halves what each load's checkpoint holds on a large file: into 10M rows, a median 39MB (max 62) -> 19MB
# (max 37); into 1M, 24 -> 17MB. The older format's checkpoint grows with the table, this one's hardly does.
STORAGE_COMPATIBILITY = "v1.4.0"

# Rows per row group that the run's writes make. Each load's checkpoint compresses the row group the load
# appended to, whole: a group of DuckDB's default 122,880 rows took ~80MB per table to compress once full, a
# spike every ~60 loads of a first run (none in runs of under 122,880 documents), against ~18MB at 16,384.
ROW_GROUP_SIZE = 16_384


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _holder(exc: BaseException) -> str:
    """The process DuckDB names as holding the file's lock ("python3.11, PID 123")."""
    m = re.search(r"held in (.+?) \(PID (\d+)\)", str(exc))
    return f"{Path(m[1]).name}, PID {m[2]}" if m else "a process DuckDB does not name"


def exists(database: str) -> bool:
    """Whether the results database has been made (a file, or a lake's catalog)."""
    return lake.exists(database) if lake.is_lake(database) else Path(database).exists()


def _open_writable(path: str, new: bool) -> duckdb.DuckDBPyConnection:
    """The file attached read-write with ROW_GROUP_SIZE rows to a row group, as the default catalog (named
    after the file, as `duckdb.connect(path)` names it). ATTACH is the only way DuckDB takes the size."""
    name = '"' + (Path(path).name.split(".")[0] or "results").replace('"', '""') + '"'
    options = [f"ROW_GROUP_SIZE {ROW_GROUP_SIZE}"] + ([f"STORAGE_VERSION '{STORAGE_COMPATIBILITY}'"] if new else [])
    return lake.attached(lambda con: con.execute(f"ATTACH {sql_string(path)} AS {name} ({', '.join(options)})"),
                         name)


def connect(path: str, read_only: bool = False, wait_seconds: float = 30.0,
            data_path: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with backoff while another process holds its lock (a `.duckdb`
    file; a lake has no such lock: storage.lake). `data_path`: a new lake's Parquet folder.

    A database newer than this code (schema version or DuckDB storage format) raises SchemaTooNew.
    """
    if lake.is_lake(path):
        con = lake.connect(path, read_only=read_only, data_path=data_path)
        try:
            migrations.refuse_newer(con, path)
        except BaseException:
            con.close()
            raise
        return con
    new = False
    if not read_only:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        new = not Path(path).exists()
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(path, read_only=True) if read_only else _open_writable(path, new)
            break
        except duckdb.IOException as exc:
            if "created with an newer version" in str(exc) or "created with a newer version" in str(exc):
                raise SchemaTooNew(f"{path}: written by a newer DuckDB than this one ({duckdb.__version__}) "
                                   "can read; upgrade taskheads to use it") from None
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                if "lock" in str(exc).lower():
                    if read_only:  # readers coexist: only a read-write holder keeps a reader out
                        raise DatabaseLocked(
                            f"{path}: locked by another process ({_holder(exc)}) holding it read-write for "
                            f"over {wait_seconds:.0f} s (a DuckDB CLI or duckdb.connect(path) without read_only "
                            "keeps every other process out): close it or open it read-only; nothing was written"
                        ) from None
                    raise DatabaseBusy(f"{path}: locked by another process ({_holder(exc)}) for over "
                                       f"{wait_seconds:.0f} s; try again") from None
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        migrations.refuse_newer(con, path)
    except BaseException:
        con.close()
        raise
    return con


def ensure_schema(database: str, *, tables: Sequence[ResultTable], data_path: str | None = None) -> None:
    """Create the schema, or migrate an older database to this code's version in one transaction; the
    result tables are the heads' declarations (heads.registry.result_tables()). `data_path`: where a
    new lake keeps its Parquet files."""
    con = connect(database, data_path=data_path)
    try:
        _migrate(con, database, tables)
    finally:
        con.close()


def _migrate(con, database: str, tables: Sequence[ResultTable]) -> None:
    """migrations.migrate; on a lake, retried while another process commits the same DDL (a conflict)."""
    delay, deadline = 0.05, time.monotonic() + LAKE_RETRY_SECONDS
    while True:
        try:
            migrations.migrate(con, database, tables)
            return
        except MigrationError as exc:
            if not (lake.is_lake(database) and lake.is_conflict(exc.__cause__ or exc)) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


# a lake commit that lost to another writer is retried this long (optimistic concurrency: every commit
# that deletes from a table another commit deleted from since this transaction began conflicts)
LAKE_RETRY_SECONDS = 300.0


def _in_transaction(con, database: str, body: Callable[[], Any]) -> Any:
    """body() in one transaction; on a lake, run again from the start while the commit conflicts with
    another writer's (each attempt sees the snapshot committed before it)."""
    delay, deadline = 0.02, time.monotonic() + LAKE_RETRY_SECONDS
    while True:
        con.execute("BEGIN TRANSACTION")
        try:
            result = body()
            con.execute("COMMIT")
            return result
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT ended the transaction already
            if not (lake.is_lake(database) and lake.is_conflict(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)


def check_database(database: str) -> None:
    """Raise SchemaTooNew for a database this code must not touch; nothing for a missing one, or one
    busy right now (the run checks again when it opens it)."""
    if not exists(database):
        return
    try:
        connect(database, read_only=True, wait_seconds=0).close()
    except DatabaseBusy:
        pass


def database_id(database: str) -> str:
    """The UUID the database got when it was created (or migrated to a versioned schema)."""
    if not exists(database):
        raise FileNotFoundError(f"{database}: no such database (its id names its staging folder)")
    con = connect(database, read_only=True)  # beside analysts' read-only connections
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
def run_lock(database: str, run_id: str | None = None, staging: str | None = None):
    """One writing run per database file at a time; the OS drops the lock if the process dies.

    On a lake many runs write at once: the run instead holds `<staging root>/<run_id>.alive` locked
    for its lifetime, so recovery touches only the packages and `runs` rows of dead runs."""
    if lake.is_lake(database):
        try:
            with _alive(database, run_id or "local", staging):
                yield
        finally:
            lake.release()  # the lake its unit tasks held in this process (storage.lake.session)
        return
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


ALIVE = ".alive"


@contextmanager
def _alive(database: str, run_id: str, staging: str | None):
    """Hold `<staging root>/<run_id>.alive` locked (flock: released by the OS when the process dies)."""
    from .staging import staging_root

    root = staging_root(database, staging)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{run_id}{ALIVE}"
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DatabaseBusy(f"{database}: run {run_id} is already running") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # not the file of a dead run that a recovery removed meanwhile
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def live_runs(database: str, staging: str | None = None) -> set[str]:
    """Runs on this lake whose process still lives (holds its .alive lock); a dead run's file is removed."""
    from .staging import staging_root

    root = staging_root(database, staging)
    live = set()
    for path in (root.glob(f"*{ALIVE}") if root.is_dir() else ()):
        try:
            handle = open(path, "a+")
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(path.name.removesuffix(ALIVE))
                continue
            path.unlink(missing_ok=True)  # dead: under its lock, so no run is taking it now
    return live


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
        _register_model(con, model)
    finally:
        con.close()


def _register_model(con, model: dict[str, Any]) -> None:
    con.execute(
        "INSERT INTO models (model_id, head, task, source, revision, resolved_revision, weights_sha256, params, "
        "dtype, registered_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM models WHERE model_id = ?)",  # (a lake has no keys: no ON CONFLICT)
        [model["model_id"], model["head"], model["task"], model["source"], model.get("revision"),
         model.get("resolved_revision"), model.get("weights_sha256"), json.dumps(model.get("params", {})),
         model.get("dtype"), _now(), model["model_id"]])


def last_throughput(database: str) -> dict[str, float]:
    """Documents per second each head inferred in the most recent run where it inferred any (from
    runs.head_stats: inferred / seconds), read-only; {} without a database."""
    if not exists(database):
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
    if not model.get("legacy_model_id") or model["legacy_model_id"] == model["model_id"]:
        return 0
    con = connect(database)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            mapped = _map_legacy_model(con, model, tables)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return mapped
    finally:
        con.close()


def _map_legacy_model(con, model: dict[str, Any], tables: Sequence[ResultTable]) -> int:
    """`map_legacy_model` inside the caller's transaction."""
    legacy, new, head = model.get("legacy_model_id"), model["model_id"], model["head"]
    if not legacy or legacy == new:
        return 0
    key = f"legacy_model:{legacy}"
    if con.execute(f"SELECT 1 FROM {META_TABLE} WHERE key = ?", [key]).fetchone():
        return 0
    if not con.execute("SELECT 1 FROM models WHERE model_id = ? AND head = ?", [legacy, head]).fetchone():
        return 0
    present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                         "current_database() AND schema_name = 'main'").fetchall()}
    (mapped,) = con.execute("SELECT count(*) FROM doc_state WHERE head = ? AND model_id = ?",
                            [head, legacy]).fetchone()
    for table in ["doc_state", "failed_docs", "evaluations", *sorted({t.name for t in tables})]:
        if table in present:
            con.execute(f"UPDATE {table} SET model_id = ? WHERE head = ? AND model_id = ?", [new, head, legacy])
    con.execute(f"DELETE FROM {META_TABLE} WHERE key = ?", [key])  # (a lake has no keys: no INSERT OR REPLACE)
    con.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", [key, new])
    return mapped


def record_evaluations(database: str, rows: Sequence[dict], *, tables: Sequence[ResultTable]) -> None:
    """Store metrics: {head, model_id, metric, value, n, source, run_id}; replaces the same key."""
    ensure_schema(database, tables=tables)
    con = connect(database)
    try:
        _in_transaction(con, database, lambda: _record_evaluations(con, rows))
    finally:
        con.close()


def _record_evaluations(con, rows: Sequence[dict]) -> None:
    for r in rows:
        con.execute("DELETE FROM evaluations WHERE head = ? AND model_id = ? AND metric = ? AND source = ? "
                    "AND run_id IS NOT DISTINCT FROM ?",
                    [r["head"], r["model_id"], r["metric"], r["source"], r.get("run_id")])
        con.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [r["head"], r["model_id"], r["metric"], float(r["value"]), int(r["n"]), r["source"],
                     r.get("run_id"), _now()])


def load_shard(database: str, manifest_path: str, *, tables: Sequence[ResultTable]) -> tuple[int, int]:
    """Load one staged package in one transaction; returns (result rows, failed rows) loaded.

    Documents that succeeded replace their earlier rows, failures and `doc_state`. A failed attempt
    deletes nothing and leaves `doc_state` (the last success) alone: it only replaces the document's
    `failed_docs` row, counting `attempts` up while text and model stay the same. The package is
    recorded in `loaded_shards`; a package already recorded is skipped, so loading twice (a retry, a
    recovery after a crash) changes nothing. `tables`: the result tables a package may name.
    """
    manifest, parts = read_manifest(manifest_path, tables)
    if lake.is_lake(database):  # on the lake this process holds (a unit task loads its own package: many per worker)
        with lake.session(database) as con:
            migrations.refuse_newer(con, database)
            loaded = _load_claimed(con, database, manifest, parts)
    else:
        con = connect(database)
        try:
            loaded = _in_transaction(con, database, lambda: _load_package(con, manifest, parts))
        finally:
            con.close()
    if loaded:
        checkpoint("loaded")
    remove_shard(manifest_path)
    return loaded or (0, 0)


def _load_package(con, manifest: dict, parts: dict, on_lake: bool = False) -> tuple[int, int] | None:
    """A package's statements inside the caller's transaction: its rows, `failed_docs`, `doc_state` and
    its `loaded_shards` marker; None (nothing done) when the marker says it was loaded before."""
    if _was_loaded(con, manifest):
        return None  # loaded before (a retry after a crash): nothing to do
    load_id = _next_load_id(con)
    _replace_docs(con, manifest["table"], manifest["head"], [(manifest, parts)], load_id,
                  replaced_loads(con, manifest["head"], [manifest], on_lake))
    return _mark_loaded(con, manifest, parts, load_id)


def _load_claimed(con, database: str, manifest: dict, parts: dict) -> tuple[int, int] | None:
    """A package into a lake, exactly once whoever else loads it at the same moment.

    DuckLake has no keys and retries a commit that does not conflict (two inserts never do), so a marker
    checked inside the transaction is not enough: the load also updates the package's claim row, made
    (committed) before. Two loaders updating it conflict on commit; the loser runs again and finds the
    marker."""
    shard = manifest["shard_id"]

    def claim() -> None:
        if not con.execute(f"SELECT 1 FROM {lake.CLAIMS} WHERE package = ?", [shard]).fetchone():
            con.execute(f"INSERT INTO {lake.CLAIMS} (package, run_id, claimed_at) VALUES (?, ?, ?)",
                        [shard, manifest["run_id"], _now()])

    def load() -> tuple[int, int] | None:
        if _was_loaded(con, manifest):
            return None
        con.execute(f"UPDATE {lake.CLAIMS} SET loaded_by = ?, loaded_at = ? WHERE package = ?",
                    [_worker(), _now(), shard])
        checkpoint("claimed")
        return _load_package(con, manifest, parts, on_lake=True)

    _in_transaction(con, database, claim)
    return _in_transaction(con, database, load)


def _worker() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _was_loaded(con, manifest: dict) -> bool:
    return bool(con.execute("SELECT 1 FROM loaded_shards WHERE shard_id = ?", [manifest["shard_id"]]).fetchone())


def _next_load_id(con) -> int:
    """The id of the load (transaction) being made: one more than the last (storage.schema, load_id)."""
    return con.execute("SELECT coalesce(max(load_id), 0) + 1 FROM loaded_shards").fetchone()[0]


def replaced_loads(con, head: str, manifests: Sequence[dict], on_lake: bool = False
                   ) -> tuple[list[int], bool] | None:
    """The loads whose rows of `head` the packages' documents can have: (load ids, whether rows from
    before load ids too), or None when not known (a package staged by older code, or from a plan of a
    database without load ids; on a lake, a plan whose snapshot is gone): then all of the head's rows
    are searched.

    A document's rows are where its `doc_state` was when planned (the package's `replaces`), unless a
    load of another plan replaced them since (a run held or recovered, or another run planned at the same
    time): loads after the plan's `planned_after` that are not the same plan's. One plan's packages never
    share a document of one head. On a lake, loads commit at once from many processes and two can take
    the same id or commit out of id order, so "since" is by commit: the loads missing from
    `loaded_shards` as of the snapshot the plan read (`planned_snapshot`)."""
    if any(m.get("replaces") is None or m.get("plan_id") is None for m in manifests):
        return None
    if on_lake and any(m.get("planned_snapshot") is None or not lake.has_snapshot(con, m["planned_snapshot"])
                       for m in manifests):
        return None
    ids = {x for m in manifests for x in m["replaces"] if x is not None}
    older = any(x is None for m in manifests for x in m["replaces"])
    since_key, later = (("planned_snapshot", "shard_id NOT IN (SELECT shard_id FROM loaded_shards AT (VERSION => ?))")
                        if on_lake else ("planned_after", "load_id > ?"))
    for since, plan in {(m[since_key], m["plan_id"]) for m in manifests}:  # a queue is mostly one plan's
        ids.update(x for (x,) in con.execute(
            f"SELECT DISTINCT load_id FROM loaded_shards WHERE head = ? AND {later} AND plan_id IS DISTINCT FROM ? "
            "AND load_id IS NOT NULL", [head, since, plan]).fetchall())
    return sorted(ids), older


def _mark_loaded(con, manifest: dict, parts: dict, load_id: int) -> tuple[int, int]:
    con.execute("INSERT INTO loaded_shards (shard_id, run_id, head, result_rows, failed_rows, loaded_at, load_id, "
                "plan_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [manifest["shard_id"], manifest["run_id"], manifest["head"], parts["results"].num_rows,
                 parts["failed"].num_rows, _now(), load_id, manifest.get("plan_id")])
    checkpoint("load")
    return parts["results"].num_rows, parts["failed"].num_rows


def _replace_docs(con, table: str, head: str, packages: Sequence[tuple[dict, dict]], load_id: int,
                  replaced: tuple[list[int], bool] | None = None) -> None:
    """The rows of packages of one head and table, whose documents are disjoint, replacing those
    documents' earlier rows, failures and `doc_state`, in the caller's transaction; written as load
    `load_id`.

    The tables have no index on doc_id. With `replaced` (`replaced_loads`) the DELETEs look only in the
    row groups of those loads (rows are appended in load order, so DuckDB skips the others by their
    min/max load_id), and a package of new documents deletes nothing: O(package), not O(table).
    Without it each DELETE scans the head's rows once (a semi-join against the packages' ids), once
    per batch of packages."""
    def covered(manifest: dict, data: pa.Table) -> pa.Table:
        n = data.num_rows
        return data.append_column("model_id", pa.array([manifest["model_id"]] * n, pa.string())) \
                   .append_column("run_id", pa.array([manifest["run_id"]] * n, pa.string()))

    staged = {"results": pa.concat_tables([p["results"] for _, p in packages]),
              "failed": pa.concat_tables([p["failed"] for _, p in packages]),
              "covered": pa.concat_tables([covered(m, p["covered"]) for m, p in packages])}
    for part, data in staged.items():
        con.register(f"staged_{part}", data)
    try:
        failures = staged["failed"].num_rows > 0
        if failures:  # attempts in a row on the same text and model: the previous failure's count + 1
            con.execute(
                "CREATE OR REPLACE TEMP TABLE new_failed AS SELECT s.* REPLACE ("
                # fingerprints compare by their first 32 hex digits (what the planner stores; earlier: 64)
                "  CASE WHEN p.doc_id IS NOT NULL AND left(p.fingerprint, 32) IS NOT DISTINCT FROM "
                "  left(s.fingerprint, 32) AND p.model_id = s.model_id THEN p.attempts + 1 ELSE 1 END::INTEGER "
                "  AS attempts) "
                "FROM staged_failed s LEFT JOIN (SELECT doc_id, fingerprint, model_id, coalesce(max(attempts), 1) "
                "  AS attempts FROM failed_docs WHERE head = ? AND stage <> 'plan' "
                "  AND doc_id IN (SELECT doc_id FROM staged_failed) GROUP BY ALL) p "
                "ON p.doc_id = s.doc_id AND s.stage <> 'plan'", [head])
        for target in (table, "doc_state"):
            _delete_done_docs(con, target, head, replaced)
        # failed_docs has no load ids: each statement on it is one hash semi-join on a single column over
        # the head's failures (~5 ms at 1M), never a join per row: ORed into one DELETE, keyed on two
        # columns, and with the attempts aggregated over all failures, a load took 0.29-0.54 s at 1M
        con.execute("DELETE FROM failed_docs WHERE head = ? AND doc_id IN (SELECT doc_id FROM staged_covered)",
                    [head])
        if failures:  # a failure replaces the one at the same place (rows without an id have no other key)
            con.execute("DELETE FROM failed_docs f WHERE head = ? AND source_row IN (SELECT source_row FROM "
                        "staged_failed) AND EXISTS (SELECT 1 FROM staged_failed s WHERE s.source_file = "
                        "f.source_file AND s.source_row = f.source_row)", [head])
        con.execute(f"INSERT INTO {table} BY NAME SELECT *, ?::BIGINT AS load_id FROM staged_results", [load_id])
        if failures:
            con.execute("INSERT INTO failed_docs BY NAME SELECT * FROM new_failed")
        con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at, load_id) "
                    "SELECT ?, doc_id, fingerprint, model_id, run_id, status, ?, ? "
                    "FROM staged_covered WHERE status = 'done'", [head, _now(), load_id])
    finally:
        for part in staged:
            con.unregister(f"staged_{part}")


def _delete_done_docs(con, target: str, head: str, replaced: tuple[list[int], bool] | None) -> None:
    """Delete the head's rows in `target` of the documents staged as done: among the loads `replaced`
    names (and the rows from before load ids, when it says so), or everywhere when it is None."""
    done = "doc_id IN (SELECT doc_id FROM staged_covered WHERE status = 'done')"
    if replaced is None:
        con.execute(f"DELETE FROM {target} WHERE head = ? AND {done}", [head])
        return
    loads, older = replaced
    if loads:  # IN (subquery): DuckDB prunes row groups by the list's min/max load_id (a constant list too)
        con.execute(f"DELETE FROM {target} WHERE head = ? AND load_id IN (SELECT unnest(?::BIGINT[])) AND {done}",
                    [head, loads])
    if older:
        con.execute(f"DELETE FROM {target} WHERE head = ? AND load_id IS NULL AND {done}", [head])


def _disjoint(packages: Sequence[tuple[dict, dict]]) -> bool:
    """No document (nor failed corpus row) in two of the packages: loaded together they give what loading
    them one after the other gives."""
    docs: set = set()
    rows: set = set()
    for _, parts in packages:
        ids = parts["covered"].column("doc_id").to_pylist()
        failed = parts["failed"]
        keys = list(zip(failed.column("source_file").to_pylist(), failed.column("source_row").to_pylist()))
        if docs.intersection(ids) or rows.intersection(keys) or len(set(ids)) < len(ids):
            return False
        docs.update(ids)
        rows.update(keys)
    return True


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
        _in_transaction(con, database, lambda: con.execute(
            "UPDATE runs SET quarantined = CASE WHEN list_contains(coalesce(quarantined, []), $1) "
            "THEN quarantined ELSE list_append(coalesce(quarantined, []), $1) END WHERE run_id = $2", [entry, run]))
    finally:
        con.close()
    dest = quarantine(manifest_path, reason)
    (log or _log.error)(f"load package quarantined, never to be loaded: {entry} (moved to {dest})")
    return 0, 0, entry


# --- every write of a run goes through its staging folder ----------------------------------------------
# A run never opens the file for writing on its own schedule: it stages its writes (load packages, and
# ops for its `runs` row, models, recovery, evaluations and finish) and `load_staged` applies whatever
# waits in the first transactions that get the file. Analysts' read-only connections then cost a run
# nothing: the writes wait on disk (for `taskheads load` or the next run) instead of failing the run.

_FINAL_OPS = ("finish", "evaluations", "evaluate")  # applied after the packages loaded with them
_MIGRATED: set[tuple] = set()  # (path, database id, result tables) brought to this code's schema here


@dataclass
class Loaded:
    """What one `load_staged` call wrote, and what still waits."""

    packages: int = 0  # load packages loaded
    rows: dict[str, int] = field(default_factory=dict)  # result rows per head, of `run_id`'s packages
    recovered_rows: int = 0  # result rows of other runs' packages (an interrupted or held run)
    quarantined: list[str] = field(default_factory=list)  # "<shard>: <reason>" of `run_id`'s packages
    ops: int = 0  # ops applied
    waiting: int = 0  # packages still staged after the call
    busy: str | None = None  # why the file could not be had, when it could not


def stage_write(database: str, run_id: str, kind: str, payload: dict, staging: str | None = None) -> str:
    """Stage one of a run's writes (`start`, `model`, `recover`, `evaluations`, `evaluate`, `finish`);
    `load_staged` applies it. The time it was staged is its time (started_at, finished_at)."""
    return stage_op(staging_dir(database, run_id, staging), kind, {"run_id": run_id, "at": _now().isoformat(),
                                                                    **payload})


def _migrate_once(con, database: str, tables: Sequence[ResultTable]) -> None:
    where = database if lake.is_lake(database) else str(Path(database).resolve())
    key = (where, migrations.database_id(con), tuple(sorted(t.name for t in tables)))
    if key[1] is None or key not in _MIGRATED:
        _migrate(con, database, tables)
        _MIGRATED.add((key[0], migrations.database_id(con), key[2]))


def _apply_op(con, op: dict, tables: Sequence[ResultTable], database: str = "", staging: str | None = None) -> None:
    kind, run_id, at = op["kind"], op["run_id"], datetime.fromisoformat(op["at"])
    if kind == "start":
        con.execute("INSERT INTO runs (run_id, started_at, status, config_path, corpus) SELECT ?, ?, 'running', ?, ? "
                    "WHERE NOT EXISTS (SELECT 1 FROM runs WHERE run_id = ?)",
                    [run_id, at, op.get("config_path"), op.get("corpus"), run_id])
    elif kind == "model":
        _register_model(con, op["model"])
        _map_legacy_model(con, op["model"], tables)
    elif kind == "recover" and lake.is_lake(database):  # many runs at once: only the dead ones
        live = live_runs(database, staging) | {run_id}
        dead = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()
                if r not in live]
        if dead:
            con.execute("UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, ?) "
                        "WHERE status = 'running' AND list_contains(?, run_id)", [at, dead])
    elif kind == "recover":  # staged under the run lock: every other run still 'running' is dead
        con.execute("UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, ?) "
                    "WHERE status = 'running' AND run_id <> ?", [at, run_id])
    elif kind == "evaluations":
        _record_evaluations(con, op["rows"])
    elif kind == "finish":
        stats, totals = op["head_stats"], {}
        for k in ("inferred", "unchanged", "skipped_failed", "failed"):
            totals[k] = sum(h.get(k, 0) for h in stats.values())
        con.execute("UPDATE runs SET finished_at = ?, status = ?, docs_read = ?, docs_inferred = ?, docs_skipped = ?, "
                    "docs_failed = ?, head_stats = ?, file_errors = ?, error = ? WHERE run_id = ?",
                    [at, op["status"], op["docs_read"], totals["inferred"],
                     totals["unchanged"] + totals["skipped_failed"], totals["failed"], json.dumps(stats),
                     list(op["file_errors"]), op.get("error"), run_id])
        if lake.is_lake(database):  # names the snapshot for `taskheads sql --at-run`
            con.execute("CALL ducklake_set_commit_message(?, 'taskheads', ?)", [lake.ALIAS, lake.finish_message(run_id)])
    else:
        raise ValueError(f"unknown staged op {kind!r}")


def _apply_ops(con, ops: list[tuple[str, dict | None]], tables: Sequence[ResultTable], log, database: str = "",
               staging: str | None = None) -> int:
    """Apply ops in one transaction, then delete their files (applying one twice changes nothing)."""
    good = [(p, op) for p, op in ops if op is not None]
    for p, op in ops:
        if op is None:
            log(f"staged write {p} is not readable JSON; dropped")

    def apply() -> None:
        if lake.is_lake(database):  # a write every ops transaction makes: two at once conflict, so a model or
            # run row another process inserts meanwhile is seen by the retry (inserts alone never conflict)
            con.execute(f"UPDATE {META_TABLE} SET value = value WHERE key = 'schema_version'")
        for _, op in good:
            _apply_op(con, op, tables, database, staging)

    if good:
        _in_transaction(con, database, apply)
    for p, _ in ops:
        Path(p).unlink(missing_ok=True)
    return len(good)


def _quarantine_package(con, path: str, reason: str, run_id: str | None, out: Loaded, log,
                        database: str = "") -> None:
    entry = f"{Path(path).name.removesuffix('.json')}: {reason}"
    run = run_id or Path(path).parent.name
    _in_transaction(con, database, lambda: con.execute(
        "UPDATE runs SET quarantined = CASE WHEN list_contains(coalesce(quarantined, []), $1) "
        "THEN quarantined ELSE list_append(coalesce(quarantined, []), $1) END WHERE run_id = $2", [entry, run]))
    dest = quarantine(path, reason)
    log(f"load package quarantined, never to be loaded: {entry} (moved to {dest})")
    if run_id and Path(path).parent.name == run_id:
        out.quarantined.append(entry)


def _load_together(con, packages: Sequence[tuple[dict, dict]]) -> list[tuple[int, int] | None]:
    """Packages in the caller's transaction (a `.duckdb` file: nobody else commits meanwhile), as one
    load: per head and table, consecutive packages with disjoint documents in one set of statements, a
    package re-covering a document after them in the next set (oldest first: the latest rows win; it
    also looks among this load's rows); each gets its marker. Returns what `_load_package` returns for
    each, in order."""
    out: list = [None] * len(packages)
    todo = [(i, m, p) for i, (m, p) in enumerate(packages) if not _was_loaded(con, m)]
    if not todo:
        return out
    load_id = _next_load_id(con)
    groups: dict[tuple[str, str], list] = {}
    for i, m, p in todo:
        groups.setdefault((m["table"], m["head"]), []).append((i, m, p))
    for (table, head), members in groups.items():
        sets = 0  # sets of this head loaded so far in this load: their rows are load_id's, not yet marked

        def load_set(run: list) -> None:
            nonlocal sets
            replaced = replaced_loads(con, head, [m for _, m, _ in run])
            if replaced is not None and sets:
                replaced = (sorted({*replaced[0], load_id}), replaced[1])
            _replace_docs(con, table, head, [(m, p) for _, m, p in run], load_id, replaced)
            sets += 1

        run: list = []  # consecutive packages with disjoint documents, loaded with one set of statements
        for member in members:
            if run and not _disjoint([(m, p) for _, m, p in run + [member]]):
                load_set(run)
                run = []
            run.append(member)
        if run:
            load_set(run)
        for i, m, p in members:
            out[i] = _mark_loaded(con, m, p, load_id)
    return out


def _load_lake(con, database: str, paths: Sequence[str], run_id: str | None, tables: Sequence[ResultTable],
               out: Loaded, log) -> None:
    """Packages into a lake, one claimed transaction each (storage.lake: other processes load at once)."""
    for path in paths:
        try:
            manifest, parts = read_manifest(path, tables)
        except FileNotFoundError:
            continue  # another process loaded it and removed its files meanwhile
        except BadPackage as exc:
            if not Path(path).exists():
                continue  # as above: removal deletes the manifest first
            _quarantine_package(con, path, str(exc), run_id, out, log, database)
            continue
        try:
            got = _load_claimed(con, database, manifest, parts)
        except _UNLOADABLE as exc:
            reason = f"does not load: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            _quarantine_package(con, path, reason, run_id, out, log, database)
            continue
        if got:
            checkpoint("loaded")
            out.packages += 1
            if run_id and Path(path).parent.name == run_id:
                out.rows[manifest["head"]] = out.rows.get(manifest["head"], 0) + got[0]
            else:
                out.recovered_rows += got[0]
        remove_shard(path)


def _load_batch(con, paths: Sequence[str], run_id: str | None, tables: Sequence[ResultTable], out: Loaded,
                log) -> None:
    """Several packages in one transaction, each as `load_shard` would (so exactly-once holds per package);
    a package that can never load is quarantined and the others loaded without it."""
    good = []
    for path in paths:
        try:
            manifest, parts = read_manifest(path, tables)
        except BadPackage as exc:
            _quarantine_package(con, path, str(exc), run_id, out, log)
            continue
        good.append((path, manifest, parts))
    if not good:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        loaded = _load_together(con, [(manifest, parts) for _, manifest, parts in good])
        con.execute("COMMIT")
    except _UNLOADABLE as exc:
        con.execute("ROLLBACK")
        if len(good) > 1:  # find the one at fault: each alone
            for path, _, _ in good:
                _load_batch(con, [path], run_id, tables, out, log)
            return
        reason = f"does not load: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        _quarantine_package(con, good[0][0], reason, run_id, out, log)
        return
    except BaseException:
        con.execute("ROLLBACK")
        raise
    for (path, manifest, _), got in zip(good, loaded):
        if got:
            checkpoint("loaded")
            out.packages += 1
            if run_id and Path(path).parent.name == run_id:
                out.rows[manifest["head"]] = out.rows.get(manifest["head"], 0) + got[0]
            else:
                out.recovered_rows += got[0]
        remove_shard(path)


def load_staged(database: str, *, tables: Sequence[ResultTable], run_id: str | None = None,
                staging: str | None = None, wait_seconds: float = 0.0, batch: int = 32,
                log: Callable[[str], Any] | None = None) -> Loaded:
    """Apply every write that waits in the database's staging folder, if the file can be had within
    `wait_seconds` (retrying with backoff): ops staged before the packages, then the packages, `batch`
    to a transaction, oldest first, then the finishing ops (a run's finish, its evaluations).

    Never raises for a busy file: `Loaded.busy` says why nothing was written and `waiting` how many
    packages wait. `run_id`: the calling run (its rows are counted per head; others' are recovered)."""
    log = log or _log.error
    out = Loaded()
    on_lake = lake.is_lake(database)
    skip = live_runs(database, staging) - {run_id} if on_lake else set()  # on a lake: others' live runs
    ops = [(p, read_op(p)) for p in staged_ops(database, staging) if Path(p).parent.name not in skip]
    manifests = [m for m in staged_manifests(database, staging) if Path(m).parent.name not in skip]
    if not ops and not manifests:
        return out
    try:
        con = connect(database, wait_seconds=wait_seconds)
    except DatabaseBusy as exc:
        out.busy, out.waiting = str(exc), len(manifests)
        return out
    evaluate = [(p, op) for p, op in ops if op is not None and op["kind"] == "evaluate"]
    try:
        _migrate_once(con, database, tables)
        final = {p for p, op in ops if op is not None and op["kind"] in _FINAL_OPS}
        out.ops += _apply_ops(con, [(p, op) for p, op in ops if p not in final], tables, log, database, staging)
        for i in range(0, len(manifests), max(1, batch)):
            if on_lake:
                _load_lake(con, database, manifests[i:i + batch], run_id, tables, out, log)
            else:
                _load_batch(con, manifests[i:i + batch], run_id, tables, out, log)
        out.ops += _apply_ops(con, [(p, op) for p, op in ops if p in final and op["kind"] != "evaluate"],
                              tables, log, database, staging)
    finally:
        con.close()
    for p, op in evaluate:  # metrics read the results just loaded, read-only; then one short write
        from .evaluate import evaluate_head

        try:
            rows = evaluate_head(database, op["files"], op["head"], op["task"], op["id_column"], op["gold_column"],
                                 op["model_id"])
        except ValueError as exc:
            log(f"head {op['head']}: evaluation against gold dropped: {exc}")
            Path(p).unlink(missing_ok=True)
            continue
        except (DatabaseBusy, duckdb.IOException):
            break
        rows = [{**r, "head": op["head"], "model_id": op["model_id"], "source": "corpus", "run_id": op["run_id"]}
                for r in rows]
        try:
            con = connect(database, wait_seconds=0)
        except DatabaseBusy:
            break
        try:
            out.ops += _apply_ops(con, [(p, {**op, "kind": "evaluations", "rows": rows})], tables, log, database,
                                  staging)
        finally:
            con.close()
    clear_staging(database, keep_run=run_id, staging=staging, keep=skip)
    out.waiting = len([m for m in staged_manifests(database, staging) if Path(m).parent.name not in skip])
    return out


def wait_readable(database: str, wait_seconds: float) -> None:
    """Return once the database can be read (at once, unless another process holds it read-write);
    DatabaseLocked naming the holder after `wait_seconds`. Nothing for a database not made yet, or a lake
    (no file lock: readers and writers share it)."""
    if not lake.is_lake(database) and Path(database).exists():
        connect(database, read_only=True, wait_seconds=wait_seconds).close()


def pending_loads(database: str, staging: str | None = None) -> int:
    """Load packages waiting in the database's staging folder."""
    return len(staged_manifests(database, staging))


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
        files, dirs = lake.readable_paths(con, database) if lake.is_lake(database) else ([], [])
        lock_down(con, [p for p in read if not Path(p).is_dir()] + files, [p for p in read if Path(p).is_dir()] + dirs,
                  utc=False)
        cur = con.execute(sql, list(params or []))
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()
