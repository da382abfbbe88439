"""DuckDB for SQL written outside the code: a head's `where`, `taskheads sql`, and whatever comes next.

Two locks, both DuckDB's own. First the text is parsed by DuckDB's parser before anything runs: a
predicate must be exactly one expression (no subquery, no parameter, nothing after it) and is spliced
back as DuckDB prints it, parenthesised and without comments, so it cannot close a bracket or hide
the rest of a statement; a `taskheads sql` query must be exactly one SELECT statement. Then it runs
on a connection with external access off and the configuration locked: only the files named (the
corpus files, the results database attached read-only) can be opened, and nothing can be
installed, loaded, attached from a file or SET back. Regexes decide nothing here.

File names are passed to DuckDB's readers as literal paths (glob characters escaped): a corpus file
named `a*.parquet` is that file, never `ab.parquet` too.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Iterable, Sequence

import duckdb


class UnsafeSQL(ValueError):
    """SQL from a config or the command line that is not allowed to run; the message says why."""


# expression classes a routing predicate never needs: they read tables or files, or take the
# statement's own parameters
_FORBIDDEN = {"SUBQUERY": "subqueries are not allowed (a predicate reads the document's columns and upstream "
                          "heads' results, nothing else)",
              "PARAMETER": "parameters ($1, ?) are not allowed",
              "STAR": "* and COLUMNS(...) are not allowed"}


def _serialize(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    (text,) = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    tree = json.loads(text)
    if tree.get("error"):
        raise UnsafeSQL(f"invalid SQL: {str(tree.get('error_message', '')).strip().splitlines()[0]}")
    return tree


def _one_expression(tree: dict) -> dict:
    """The single expression of `SELECT <expr>`, or UnsafeSQL if the text holds anything else."""
    statements = tree.get("statements", [])
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    if node and statements[0].get("named_param_map"):
        raise UnsafeSQL(_FORBIDDEN["PARAMETER"])
    clean = (node.get("type") == "SELECT_NODE" and len(node.get("select_list", [])) == 1
             and not node.get("modifiers") and not (node.get("cte_map") or {}).get("map")
             and (node.get("from_table") or {}).get("type") == "EMPTY"
             and all(node.get(k) is None for k in ("where_clause", "having", "sample", "qualify"))
             and not node.get("group_expressions") and not node.get("group_sets")
             and node.get("aggregate_handling", "STANDARD_HANDLING") == "STANDARD_HANDLING")
    expr = node["select_list"][0] if clean else {}
    if not clean or expr.get("alias"):
        raise UnsafeSQL("must be exactly one SQL expression, with nothing after it (no ';', FROM, WHERE, UNION, "
                        "ORDER BY, LIMIT or alias)")
    _refuse_forbidden(expr)
    return expr


def _refuse_forbidden(value) -> None:
    if isinstance(value, dict):
        if value.get("class") in _FORBIDDEN:
            raise UnsafeSQL(_FORBIDDEN[value["class"]])
        for v in value.values():
            _refuse_forbidden(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_forbidden(v)


@functools.lru_cache(maxsize=512)
def check_expression(sql: str) -> str:
    """`sql` as one parenthesised SQL expression, printed back by DuckDB (comments gone), safe to
    splice into a statement; UnsafeSQL if it is anything more than one expression."""
    if not isinstance(sql, str) or not sql.strip():
        raise UnsafeSQL("empty predicate")
    con = duckdb.connect()  # parsing only: nothing in `sql` is executed
    try:
        tree = _serialize(con, "SELECT " + sql)
        _one_expression(tree)
        (printed,) = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchone()
        if not printed.startswith("SELECT "):
            raise UnsafeSQL("cannot be printed back as one expression")
        canonical = printed[len("SELECT "):]
        # what is spliced is the printed text: it must itself be exactly one safe expression
        _one_expression(_serialize(con, "SELECT " + canonical))
        return f"({canonical})"
    finally:
        con.close()


def check_select(sql: str) -> None:
    """Refuse anything but exactly one SELECT statement (DESCRIBE, SHOW, SUMMARIZE, WITH and FROM-first
    queries are SELECTs; COPY, EXPORT, ATTACH, INSTALL, LOAD, SET, PRAGMA, CALL, EXPLAIN are not)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise UnsafeSQL(f"invalid SQL: {str(exc).strip().splitlines()[0]}") from None
    if len(statements) != 1:
        raise UnsafeSQL(f"exactly one SELECT query is allowed, got {len(statements)} statements")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind != "SELECT":
        raise UnsafeSQL(f"only a SELECT query is allowed, not {kind} (no writing files, attaching databases, "
                        "installing or loading extensions, or changing settings)")


def sql_string(text: str) -> str:
    """`text` as a SQL string literal, for the statements that take no parameters (ATTACH, LOAD)."""
    return "'" + text.replace("'", "''") + "'"


def literal_path(path: str) -> str:
    """`path` for DuckDB's file readers, matching only the file of that name: its glob characters
    (* ? [) escaped as one-character classes ([*] [?] [[])."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in str(path))


def _file_forms(path: str) -> list[str]:
    absolute = os.path.abspath(path)
    return list(dict.fromkeys([str(path), absolute, literal_path(path), literal_path(absolute)]))


def lock_down(con: duckdb.DuckDBPyConnection, read_files: Iterable[str] = (), read_dirs: Iterable[str] = (),
              utc: bool = True) -> duckdb.DuckDBPyConnection:
    """Turn external access off for `con`, except `read_files` (plain and escaped names) and everything
    under `read_dirs`, then lock the configuration so no statement can give any of it back.

    DuckDB cannot allow a path for reading only: a listed file is writable by COPY. So what runs on a
    locked connection must be an expression (check_expression) or one SELECT (check_select)."""
    files = [f for p in read_files for f in _file_forms(p)]
    dirs = [os.path.abspath(d) for d in read_dirs]
    if utc:  # ids and predicates over timestamps with time zone read the same on every machine
        con.execute("SET TimeZone = 'UTC'")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET python_enable_replacements = false")  # no scanning the caller's Python variables
    if files:
        con.execute("SET allowed_paths = ?", [files])
    if dirs:
        con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def attach_read_only(con: duckdb.DuckDBPyConnection, database: str, name: str = "results",
                     wait_seconds: float = 30.0) -> None:
    """ATTACH `database` read-only as `name`, waiting with backoff while a writer holds its lock."""
    deadline, delay = time.monotonic() + wait_seconds, 0.05
    sql = f"ATTACH {sql_string(database)} AS {name} (READ_ONLY)"
    while True:
        try:
            con.execute(sql)
            return
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# what one scanning thread holds at once (a Parquet row group of text, decompressed, and its hashes): measured on
# 122,880-row groups of news text, 128MB ran out of memory with two threads and planned with one
MEMORY_PER_THREAD = 96_000_000  # 96MB, as the config writes sizes


def bound_memory(con: duckdb.DuckDBPyConnection, memory_limit: str) -> None:
    """Cap the connection's memory at `memory_limit` (its buffer pool; beyond it DuckDB spills to its
    temp_directory), with as many threads as that memory holds (at least one, at most the machine's), and
    freed memory handed back to the system at once instead of kept up to DuckDB's 128MB flush threshold: the
    process's peak then follows the limit, not the corpus."""
    con.execute("SET memory_limit = ?", [memory_limit])
    (limit,) = con.execute("SELECT value FROM duckdb_settings() WHERE name = 'memory_limit'").fetchone()
    (threads,) = con.execute("SELECT current_setting('threads')").fetchone()
    con.execute(f"SET threads = {max(1, min(int(threads), memory_bytes(limit) // MEMORY_PER_THREAD))}")
    con.execute("SET allocator_flush_threshold = '16MiB'")
    con.execute("SET allocator_bulk_deallocation_flush_threshold = '16MiB'")


def memory_bytes(size: str) -> int:
    """DuckDB's printed size ('96.0 MiB', '1.8 GiB') in bytes."""
    number, unit = size.split()
    return int(float(number) * {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit])


def sandboxed_connection(read_files: Sequence[str] = (), database: str | None = None,
                         wait_seconds: float = 30.0, memory_limit: str | None = None,
                         temp_directory: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that can read only `read_files`, with `database` (if given) attached
    read-only as `results`; external access off and configuration locked before it is returned.
    `memory_limit` bounds its buffer pool; beyond it DuckDB spills to `temp_directory`."""
    con = duckdb.connect()
    try:
        if memory_limit:
            bound_memory(con, memory_limit)
        if temp_directory:
            con.execute("SET temp_directory = ?", [temp_directory])
        from . import lake

        if lake.is_lake(database):  # attached before the lock-down (it loads extensions), then its files allowed
            lake.attach(con, database, name="results", read_only=True)
            files, dirs = lake.readable_paths(con, database, "results")
            lock_down(con, list(read_files) + files, dirs)
            return con
        db_files = [database, database + ".wal"] if database else []
        lock_down(con, list(read_files) + db_files)
        if database:
            attach_read_only(con, database, wait_seconds=wait_seconds)
        return con
    except BaseException:
        con.close()
        raise
