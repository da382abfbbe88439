"""Reading a results database from Python and the CLI: a read-only connection that closes, a head's
current rows as Arrow, and query results written as CSV, JSON or Parquet by this process.

The writing happens here, on a fresh in-memory connection holding only the result (or with pyarrow),
never through the user's SQL: in `taskheads sql` the sandbox still refuses `COPY … TO`.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import duckdb
import pyarrow as pa

from .db import connect, exists
from .lake import is_lake, readable_paths
from .sandbox import check_select, lock_down
from .views import create_views, result_tables_in



@contextmanager
def open_reader(database: str | os.PathLike, wait_seconds: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """The database opened read-only (waiting while a run holds it for a load), closed on leaving.

    Every result table's `latest_<table>` view is there, also in a database made before the views
    (as temporary views). A missing file is FileNotFoundError: opening never creates one."""
    path = str(database)
    if not (exists(path) if is_lake(path) else Path(path).is_file()):
        raise FileNotFoundError(f"{path}: no such database")
    con = connect(path, read_only=True, wait_seconds=wait_seconds)
    try:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        missing = [t for t in result_tables_in(con) if f"latest_{t}" not in views]
        if missing:
            create_views(con, missing, temporary=True)
        yield con
    finally:
        con.close()


def head_results(database: str | os.PathLike, head: str, wait_seconds: float = 30.0,
                 table_of: Callable[[str, dict], str] | None = None) -> pa.Table:
    """The head's current rows (its `latest_<table>` view), ordered; LookupError for a head that never ran.

    The table is the one holding rows of the head's latest model (the model of its most recently
    updated `doc_state` row), so a head whose task changed reads its new table. A head that ran and
    found nothing (no entity in any document) has no rows to tell its table: `table_of(task, params)`
    of its model names it (the caller knows the heads; storage does not), and the result is empty."""
    with open_reader(database, wait_seconds) as con:
        # fetchall: DuckDB 2 refuses the next statement while a result is unfinished
        latest = con.execute("SELECT arg_max(model_id, updated_at) FROM doc_state WHERE head = ?", [head]).fetchall()[0][0]
        tables = result_tables_in(con)
        table = None
        if latest is not None:
            table = next((t for t in tables if con.execute(f"SELECT 1 FROM {t} WHERE head = ? AND model_id = ? LIMIT 1",
                                                           [head, latest]).fetchall()), None)
            table = table or next((t for t in tables if con.execute(f"SELECT 1 FROM {t} WHERE head = ? LIMIT 1",
                                                                    [head]).fetchall()), None)
            if table is None and table_of is not None:
                model = con.execute("SELECT task, params FROM models WHERE model_id = ?", [latest]).fetchall()
                named = table_of(model[0][0], json.loads(model[0][1] or "{}")) if model else None
                table = named if named in tables else None
        if table is None:
            heads = [r[0] for r in con.execute("SELECT DISTINCT head FROM doc_state ORDER BY head").fetchall()]
            raise LookupError(f"no results for head {head!r} in {database} (heads with results: "
                              f"{', '.join(heads) or 'none'})")
        return con.sql(f"SELECT * FROM latest_{table} WHERE head = $head ORDER BY ALL",
                       params={"head": head}).to_arrow_table()


@contextmanager
def _sandboxed(database: str, sql: str, wait_seconds: float, read: Sequence[str], at_run: str | None = None):
    """One SELECT on the database opened read-only and locked down (as storage.db.query); `at_run`: a lake
    as it was when that run finished (DuckLake time travel)."""
    check_select(sql)
    if at_run is not None:
        from .lake import connect as lake_connect, snapshot_after_run

        if not is_lake(database):
            raise ValueError("--at-run needs a DuckLake database (ducklake:...): a DuckDB file keeps no history")
        con = lake_connect(database, read_only=True, snapshot=snapshot_after_run(database, at_run))
    else:
        con = connect(database, read_only=True, wait_seconds=wait_seconds)
    try:
        files, dirs = readable_paths(con, database) if is_lake(database) else ([], [])
        lock_down(con, [p for p in read if not Path(p).is_dir()] + files, [p for p in read if Path(p).is_dir()] + dirs,
                  utc=False)
        yield con
    finally:
        con.close()


def select_rows(database: str, sql: str, limit: int | None = None, wait_seconds: float = 30.0,
                read: Sequence[str] = (), at_run: str | None = None) -> tuple[list[str], list[tuple], bool]:
    """(columns, at most `limit` rows (all with None), whether more rows were left out)."""
    with _sandboxed(database, sql, wait_seconds, read, at_run) as con:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description]
        if limit is None:
            return columns, cur.fetchall(), False
        rows = cur.fetchmany(limit + 1)
        return columns, rows[:limit], len(rows) > limit


def select_arrow(database: str, sql: str, wait_seconds: float = 30.0, read: Sequence[str] = (),
                 at_run: str | None = None) -> pa.Table:
    with _sandboxed(database, sql, wait_seconds, read, at_run) as con:
        return con.sql(sql).to_arrow_table()


def _jsonable(v):
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, timedelta):
        return v.total_seconds()
    return str(v)  # UUID, anything else DuckDB returns as an object


def json_text(columns: list[str], rows: list[tuple]) -> str:
    """An array of objects, one per row, keys in column order; timestamps ISO 8601, decimals numbers,
    blobs hex, intervals seconds; maps are objects."""
    return json.dumps([dict(zip(columns, r)) for r in rows], default=_jsonable, ensure_ascii=False) + "\n"


def write_file(path: str | os.PathLike, fill) -> None:
    """Write through a temporary file beside `path`, renamed over it once complete (no half file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(table: pa.Table, path: str) -> None:
    """CSV with a header, as DuckDB writes it (nested values in its text form, so `read_csv` with the
    column types reads them back)."""
    con = duckdb.connect()
    try:
        con.from_arrow(table).write_csv(path, header=True)
    finally:
        con.close()


def write_parquet(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def copy_to(path: str, out: IO[str]) -> None:
    with open(path, encoding="utf-8", newline="") as handle:
        while chunk := handle.read(1 << 20):
            out.write(chunk)
