"""DuckLake: the results as a lake (a catalog in SQLite or PostgreSQL, data in Parquet files).

`database = "ducklake:sqlite:results.sqlite"` or `"ducklake:postgres:dbname=... host=... port=..."`.
A lake has the same tables and views as a `.duckdb` file, but any number of processes read and write it
at once, each transaction on a whole committed snapshot. So there is no file lock here: runs, Dask
workers and analysts all connect at will, and exactly-once loading rests on a claim that conflicts
(`taskheads_claims`, see db._load_lake_package). Everything DuckLake-specific lives in this module;
storage.db dispatches on the `ducklake:` prefix.

Offline: DuckDB installs extensions from its own repository at run time; the `lake` extra ships the
ducklake, sqlite and postgres extensions as wheels (built for DuckDB 1.5.5), installed from there.
"""
from __future__ import annotations

import fcntl
import os
import random
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb

from core.errors import ConfigError

from .sandbox import sql_string

PREFIX = "ducklake:"
ALIAS = "lake"  # the name the lake is attached as (then USE lake: queries name tables as in a file)
CATALOGS = ("sqlite", "postgres")
CLAIMS = "taskheads_claims"


class LakeError(ConfigError):
    """A lake that cannot be used as configured (unknown catalog, missing staging, extension missing): one
    line, reported as a config error (exit 2) before any work."""


def is_lake(database: str | os.PathLike | None) -> bool:
    return isinstance(database, str) and database.startswith(PREFIX)


def parse(database: str) -> tuple[str, str]:
    """(catalog kind, target): the SQLite file, or the PostgreSQL connection string."""
    kind, sep, target = database[len(PREFIX):].partition(":")
    if kind not in CATALOGS or not sep or not target.strip():
        raise LakeError(f"database {database!r}: a lake is ducklake:sqlite:FILE or "
                        "ducklake:postgres:CONNECTION (e.g. ducklake:postgres:dbname=results host=db)")
    return kind, target


def resolve(database: str, base: Path) -> str:
    """The lake with its SQLite catalog path made absolute (relative to the config file's folder)."""
    kind, target = parse(database)
    if kind == "sqlite":
        p = Path(os.path.expanduser(target))
        target = str(p if p.is_absolute() else base / p)
    return f"{PREFIX}{kind}:{target}"


def catalog_file(database: str) -> Path | None:
    """The SQLite catalog file (None for PostgreSQL)."""
    kind, target = parse(database)
    return Path(target) if kind == "sqlite" else None


def default_data_path(database: str) -> str | None:
    """Where the Parquet files go unless `data_path` says: beside a SQLite catalog, `<catalog>.files/`;
    a PostgreSQL catalog has no such place (its clients may be on other machines): None."""
    file = catalog_file(database)
    return str(file.absolute()) + ".files/" if file else None


def local_name(database: str) -> str:
    """A file-name-safe name of the lake (for the staging folder under a shared `staging`)."""
    kind, target = parse(database)
    name = Path(target).name if kind == "sqlite" else target
    return "ducklake-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80]


# --- extensions -------------------------------------------------------------------------------------------
_EXT = {"sqlite": "sqlite_scanner", "postgres": "postgres_scanner", "ducklake": "ducklake"}


def _load_extensions(con: duckdb.DuckDBPyConnection, kind: str) -> None:
    """LOAD ducklake and the catalog's extension; installed from the `lake` extra's wheels when DuckDB
    does not have them yet (under a file lock: parallel processes install once, not over each other)."""
    needed = ("ducklake", kind)
    installed = {r[0] for r in con.execute("SELECT extension_name FROM duckdb_extensions() WHERE installed "
                                           "OR loaded").fetchall()}
    missing = [e for e in needed if _EXT[e] not in installed]
    if missing:
        try:
            import duckdb_extensions  # type: ignore[import-not-found]
        except ImportError:
            raise LakeError(f"a ducklake database needs DuckDB's {', '.join(missing)} extension(s): install "
                            "taskheads[lake] (the extensions as wheels, for duckdb 1.5.5), or with internet access "
                            f"run INSTALL {'; INSTALL '.join(missing)} in DuckDB once") from None
        lock = Path.home() / ".duckdb" / "taskheads-extensions.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                for e in missing:
                    try:
                        duckdb_extensions.import_extension(e, con=con)
                    except (ImportError, duckdb.Error) as exc:
                        raise LakeError(f"DuckDB's {e} extension is not installable here ({type(exc).__name__}: "
                                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): install "
                                        f"taskheads[lake] with duckdb 1.5.5, or run INSTALL {e} in DuckDB") from None
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    for e in needed:
        con.execute(f"LOAD {e}")


def _new_sqlite_catalog(file: Path) -> None:
    """Create the SQLite catalog in WAL mode: readers then never block a committing writer (in SQLite's
    default journal mode an open read transaction holds every commit back)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(file, timeout=60)  # two runs making it at once: the second waits, then finds WAL set
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def attach(con: duckdb.DuckDBPyConnection, database: str, name: str = ALIAS, read_only: bool = False,
           data_path: str | None = None, snapshot: int | None = None) -> None:
    """ATTACH the lake to `con` as `name` (loading the extensions first). A new SQLite catalog is made
    here (WAL mode) with its data path; `data_path` matters only when the lake is created (DuckLake
    stores it in the catalog); `snapshot`: the lake as it was at that snapshot id (read-only)."""
    kind, target = parse(database)
    _load_extensions(con, kind)
    options = []
    file = catalog_file(database)
    if file is not None and not file.exists():
        if read_only or snapshot is not None:
            raise FileNotFoundError(f"{file}: no such lake catalog")
        _new_sqlite_catalog(file)
        data_path = data_path or default_data_path(database)
    if data_path:
        absolute = data_path if "://" in data_path else str(Path(data_path).absolute())
        options.append(f"DATA_PATH {sql_string(absolute.rstrip('/') + '/')}")
    if read_only or snapshot is not None:
        options.append("READ_ONLY")
    if snapshot is not None:
        options.append(f"SNAPSHOT_VERSION {int(snapshot)}")
    sql = f"ATTACH {sql_string(PREFIX + kind + ':' + target)} AS {name}" + (f" ({', '.join(options)})" if options else "")
    delay, deadline = 0.05, time.monotonic() + 60
    while True:
        try:
            con.execute(sql)
            return
        except duckdb.Error as exc:  # two processes making the catalog's tables at once: the loser retries
            text = str(exc).lower()
            if "data_path is not set" in text and file is not None and not (read_only or snapshot is not None
                                                                            or data_path):
                # another run made the file and not yet DuckLake's tables: make the lake, as it does
                data_path = default_data_path(database)
                return attach(con, database, name, read_only, data_path, snapshot)
            transient = any(w in text for w in ("lock", "conflict", "already exists", "duplicate key", "unique"))
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)


def connect(database: str, read_only: bool = False, data_path: str | None = None,
            snapshot: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake attached and in use: `SELECT * FROM runs` reads the lake."""
    return attached(lambda con: attach(con, database, read_only=read_only, data_path=data_path, snapshot=snapshot),
                    ALIAS)


def attached(attach_to: Callable[[duckdb.DuckDBPyConnection], None], name: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the database `attach_to` attaches as `name` in use (closed if that fails)."""
    con = duckdb.connect()
    try:
        attach_to(con)
        con.execute(f"USE {name}")
    except BaseException:
        con.close()
        raise
    return con


# --- a lake held per process ---------------------------------------------------------------------------------
# A package loaded into a lake from a new connection spent about half its time connecting (LOAD of the
# extensions, ATTACH of the catalog: ~0.3 s of ~0.65 s). A process that loads many (unit tasks on threads or a
# Dask worker, each committing its own package) keeps one DuckDB instance with the lake attached, and each load
# opens a connection of its own on it (a cursor: its own transaction, as a new connection's would be).
HELD_MEMORY_LIMIT = "256MB"  # the held instance's buffer pool (loads append a package; they need little)


_held: dict[tuple[int, str], duckdb.DuckDBPyConnection] = {}
_held_lock = threading.Lock()


@contextmanager
def session(database: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection of its own (its transactions apart from other threads') on this process's held instance
    of the lake, attached on first use; closed on exit, the instance kept until `release`."""
    key = (os.getpid(), database)  # a forked child attaches its own
    with _held_lock:
        held = _held.get(key)
        if held is None:
            held = connect(database)
            try:
                held.execute("SET memory_limit = ?", [HELD_MEMORY_LIMIT])
            except BaseException:
                held.close()
                raise
            _held[key] = held
        con = held.cursor()
    try:
        con.execute(f"USE {ALIAS}")
        yield con
    finally:
        con.close()


def release() -> None:
    """Close the lakes this process holds (a run's end, a test's)."""
    with _held_lock:
        for con in _held.values():
            con.close()
        _held.clear()


def exists(database: str) -> bool:
    """Whether the lake has been made (its catalog holds taskheads' tables)."""
    file = catalog_file(database)
    if file is not None and not file.exists():
        return False
    try:  # a file another run has made without DuckLake's tables yet does not attach: no lake yet
        con = connect(database, read_only=True)
    except duckdb.Error:
        return False
    try:
        return bool(con.execute("SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND table_name = "
                                "'taskheads_meta'", [ALIAS]).fetchone())
    finally:
        con.close()


def readable_paths(con: duckdb.DuckDBPyConnection, database: str, name: str = ALIAS) -> tuple[list[str], list[str]]:
    """(files, folders) a locked-down connection must still open to read the attached lake."""
    files, dirs = [], []
    file = catalog_file(database)
    if file is not None:
        files += [str(file), f"{file}-wal", f"{file}-shm", f"{file}-journal"]
    row = con.execute("SELECT value FROM ducklake_options(?) WHERE option_name = 'data_path'", [name]).fetchone()
    if row and row[0] and "://" not in row[0]:
        dirs.append(os.path.abspath(row[0]))
    return files, dirs


def is_conflict(exc: BaseException) -> bool:
    """A commit another writer got in before (a logical conflict, or the SQLite catalog busy): retry."""
    text = str(exc).lower()
    return isinstance(exc, duckdb.Error) and ("conflict" in text or "database is locked" in text
                                              or "failed to commit" in text or "busy" in text)


# --- maintenance and time travel ------------------------------------------------------------------------
def compact(database: str, keep_days: float = 7.0) -> dict[str, int]:
    """DuckLake's maintenance: merge small adjacent files, expire snapshots older than `keep_days` (time
    travel, `--at-run`, reaches back that far afterwards), delete files no snapshot needs any more.
    Returns counts of what each step touched."""
    con = connect(database)
    try:
        out = {}
        out["merged"] = len(con.execute("CALL ducklake_merge_adjacent_files(?)", [ALIAS]).fetchall())
        out["expired"] = len(con.execute("CALL ducklake_expire_snapshots(?, older_than => now() - to_seconds(?))",
                                         [ALIAS, float(keep_days) * 86400]).fetchall())
        out["cleaned"] = len(con.execute("CALL ducklake_cleanup_old_files(?, cleanup_all => true)",
                                         [ALIAS]).fetchall())
        return out
    finally:
        con.close()


def current_snapshot(con: duckdb.DuckDBPyConnection, name: str = ALIAS) -> int:
    return int(con.execute("SELECT max(snapshot_id) FROM ducklake_snapshots(?)", [name]).fetchone()[0])


def has_snapshot(con: duckdb.DuckDBPyConnection, snapshot: int, name: str = ALIAS) -> bool:
    """Whether time travel can still reach `snapshot` (`compact` expires old ones)."""
    return bool(con.execute("SELECT 1 FROM ducklake_snapshots(?) WHERE snapshot_id = ?", [name, snapshot]).fetchone())


def finish_message(run_id: str) -> str:
    """The commit message of the snapshot that finished a run (`taskheads sql --at-run` looks it up)."""
    return f"taskheads run {run_id} finished"


def snapshot_after_run(database: str, run_id: str) -> int:
    """The snapshot id committed when the run finished; LookupError if there is none."""
    con = connect(database, read_only=True)
    try:
        row = con.execute("SELECT max(snapshot_id) FROM ducklake_snapshots(?) WHERE commit_message = ?",
                          [ALIAS, finish_message(run_id)]).fetchone()
    finally:
        con.close()
    if not row or row[0] is None:
        raise LookupError(f"{database}: no snapshot records the end of run {run_id!r} (a run on this lake that "
                          "finished; the runs table lists the runs)")
    return int(row[0])
