"""Schema versions, so a database written by older code keeps working after an upgrade.

Every database records its version in `taskheads_meta` (key/value: schema_version, database_id,
created_at; after a migration also migrated_from, migrated_at). Opening an older database for
writing migrates it in ONE transaction (all steps or none); a database newer than this code is
refused with one line, by readers too (`connect`), so old code never writes a schema it does not know.

Versions:
  0  before versioning: no `taskheads_meta`, recognised by our tables. Its shape depends on the
     release that wrote it (the oldest lacks failed_docs.source_row, the runs counters, doc_state,
     evaluations and the later result tables; see tests/fixtures/README.md).
  1  `taskheads_meta`, runs.quarantined, and every table and column of the schema at that time.
  2  failed_docs.kind / attempts / fingerprint; doc_state holds successes only.
  3  the `embeddings` table (a step, written before result tables were created by themselves).
  4  `load_id` on `loaded_shards` (with `plan_id`), `doc_state` and the result tables.

Result tables are the heads' (core.tables.ResultTable, handed in as `tables`): a head's new table is
created IF NOT EXISTS whenever a database is opened for writing, at any version, so a new head needs
no step. Any other change (a column added to a table, storage's own tables) is a step:

To change the schema: change `schema.CORE_DDL` or a head's table (what a new database gets) AND
append one step to `STEPS` that brings version len(STEPS) - 1 to the new shape. SCHEMA_VERSION
follows. Steps are frozen once released: never edit one, append another. A step is a list of SQL statements, or a function of the
connection for what SQL alone cannot say. tests/test_migrations.py checks that migrating the oldest
real database gives exactly the tables, columns, types, constraints and views of a new one.
Migrated tables get added columns at the end: write with column names (INSERT ... BY NAME or a
column list), never by position.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Callable, Sequence, Union

import duckdb

from core.errors import SchemaTooNew
from core.names import quote
from core.tables import ResultTable

from .lake import CLAIMS, is_lake
from .schema import CLAIMS_DDL, META_TABLE, ddl, lake_sql, result_ddl
from .views import create_views, view_definitions

Step = Union[list[str], Callable[[duckdb.DuckDBPyConnection], None]]

# Version 1, frozen: what a pre-versioning database may lack. Tables added after the first release
# are created (in their version-1 shape); columns added to older tables are added.
_V1_TABLES = {
    "doc_state": "head VARCHAR, doc_id VARCHAR, fingerprint VARCHAR, model_id VARCHAR, run_id VARCHAR, "
                 "status VARCHAR, updated_at TIMESTAMPTZ",
    "evaluations": "head VARCHAR, model_id VARCHAR, metric VARCHAR, value DOUBLE, n BIGINT, source VARCHAR, "
                   "run_id VARCHAR, evaluated_at TIMESTAMPTZ",
    "lm_scores": "head VARCHAR, doc_id VARCHAR, perplexity DOUBLE, mean_nll DOUBLE, pseudo_perplexity DOUBLE, "
                 "mean_log_prob DOUBLE, n_tokens BIGINT, n_windows INTEGER, run_id VARCHAR, model_id VARCHAR",
    "generations": "head VARCHAR, doc_id VARCHAR, prompt_id INTEGER, text VARCHAR, n_new_tokens INTEGER, "
                   "finish_reason VARCHAR, run_id VARCHAR, model_id VARCHAR",
    "fill_mask": "head VARCHAR, doc_id VARCHAR, mask_index INTEGER, token VARCHAR, token_id BIGINT, score DOUBLE, "
                 "rank INTEGER, run_id VARCHAR, model_id VARCHAR",
    "languages": "head VARCHAR, doc_id VARCHAR, language VARCHAR, confidence DOUBLE, n_chars BIGINT, "
                 "run_id VARCHAR, model_id VARCHAR",
    "choices": "head VARCHAR, doc_id VARCHAR, choice VARCHAR, score DOUBLE, logit DOUBLE, rank INTEGER, "
               "truncated BOOLEAN, run_id VARCHAR, model_id VARCHAR",
}
_V1_COLUMNS = [("runs", "docs_inferred", "BIGINT"), ("runs", "docs_skipped", "BIGINT"),
               ("runs", "head_stats", "VARCHAR"), ("runs", "quarantined", "VARCHAR[]"),
               ("failed_docs", "source_row", "BIGINT")]

STEPS: list[Step] = [
    # 0 -> 1: a database from before versioning
    [f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)",
     *(f"CREATE TABLE IF NOT EXISTS {t} ({cols})" for t, cols in _V1_TABLES.items()),
     *(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {ty}" for t, c, ty in _V1_COLUMNS)],
    # 1 -> 2: failed attempts live in failed_docs (kind, attempts, the fingerprint that failed); doc_state
    # keeps only successes. Earlier failures: plan/read/encode were the text's fault (terminal), a
    # forward/decode failure may have been memory or a since-fixed bug (transient: retried).
    ["ALTER TABLE failed_docs ADD COLUMN IF NOT EXISTS kind VARCHAR",
     "ALTER TABLE failed_docs ADD COLUMN IF NOT EXISTS attempts INTEGER",
     "ALTER TABLE failed_docs ADD COLUMN IF NOT EXISTS fingerprint VARCHAR",
     "UPDATE failed_docs f SET fingerprint = d.fingerprint FROM doc_state d "
     "WHERE d.head = f.head AND d.doc_id = f.doc_id AND d.status = 'failed'",
     "UPDATE failed_docs SET attempts = 1, kind = CASE WHEN stage IN ('plan', 'read', 'encode') THEN 'terminal' "
     "ELSE 'transient' END",
     "DELETE FROM doc_state WHERE status = 'failed'"],
    # 2 -> 3: the embedding head's table
    ['CREATE TABLE IF NOT EXISTS embeddings ("head" VARCHAR, "doc_id" VARCHAR, "window" INTEGER, "dim" INTEGER, '
     '"embedding" FLOAT[], "n_tokens" BIGINT, "run_id" VARCHAR, "model_id" VARCHAR)'],
    # 3 -> 4: rows carry the load that wrote them (storage.schema); earlier rows keep NULL, which a
    # replacement of their documents finds with `load_id IS NULL`
    lambda con: _add_load_ids(con),
]
SCHEMA_VERSION = len(STEPS)


def _add_load_ids(con: duckdb.DuckDBPyConnection) -> None:
    """`load_id` on `loaded_shards` (with `plan_id`), `doc_state` and every result table: the tables of
    the current schema with head, doc_id, run_id and model_id, but failed_docs."""
    con.execute("ALTER TABLE loaded_shards ADD COLUMN IF NOT EXISTS load_id BIGINT")
    con.execute("ALTER TABLE loaded_shards ADD COLUMN IF NOT EXISTS plan_id VARCHAR")
    tables = [t for (t,) in con.execute(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'main' "
        "AND table_catalog = current_database() AND column_name IN ('head', 'doc_id', 'run_id', 'model_id') "
        "AND table_name IN (SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
        "  AND table_catalog = current_database()) "
        "GROUP BY table_name HAVING count(*) = 4 ORDER BY 1").fetchall() if t != "failed_docs"]
    for table in tables:
        con.execute(f"ALTER TABLE {quote(table)} ADD COLUMN IF NOT EXISTS load_id BIGINT")

# tables every release wrote: one of them in a database without `taskheads_meta` means version 0
_PRE_VERSIONING_TABLES = ("runs", "loaded_shards", "failed_docs")


class MigrationError(Exception):
    """A migration step failed; the transaction was rolled back, the database is as it was."""


def too_new(path: str, version: int) -> SchemaTooNew:
    return SchemaTooNew(f"{path}: schema version {version} is newer than this taskheads supports "
                        f"({SCHEMA_VERSION}); upgrade taskheads to use it")


def stored_version(con: duckdb.DuckDBPyConnection, path: str) -> int | None:
    """The database's schema version: None for a database without our tables (new), 0 before versioning."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                        "current_database() AND schema_name = 'main'").fetchall()}
    if META_TABLE in tables:
        row = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit():
            raise MigrationError(f"{path}: {META_TABLE} has no valid schema_version ({row and row[0]!r})")
        return int(row[0])
    return 0 if tables & set(_PRE_VERSIONING_TABLES) else None


def refuse_newer(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Raise SchemaTooNew for a database newer than this code (cheap: one lookup)."""
    try:
        row = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        return  # new or pre-versioning
    if row is not None and str(row[0]).isdigit() and int(row[0]) > SCHEMA_VERSION:
        raise too_new(path, int(row[0]))


def _set(con: duckdb.DuckDBPyConnection, **values) -> None:
    for key, value in values.items():  # (a lake has no keys: no INSERT OR REPLACE)
        con.execute(f"DELETE FROM {META_TABLE} WHERE key = ?", [key])
        con.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", [key, str(value)])


def _lake_complete(con: duckdb.DuckDBPyConnection, tables: Sequence[ResultTable]) -> bool:
    """A lake at this version with every result table, view and the claims table: nothing to do. (On a
    lake every DDL statement is a commit that conflicts with another process's same DDL, so a lake is
    changed only when something is missing.)"""
    present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                         "current_database() AND schema_name = 'main'").fetchall()}
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = "
                                       "current_database() AND NOT internal").fetchall()}
    names = [t.name for t in tables]
    return (set(names) | {CLAIMS} <= present) and set(view_definitions(names)) <= views


def _apply(con: duckdb.DuckDBPyConnection, step: Step) -> None:
    if callable(step):
        step(con)
    else:
        for sql in step:
            con.execute(sql)


def migrate(con: duckdb.DuckDBPyConnection, path: str, tables: Sequence[ResultTable]) -> int | None:
    """Bring the database to SCHEMA_VERSION in one transaction (a new one gets `schema.ddl`), create the
    result tables it lacks and (re)create the views; returns the version it had (None: it was new)."""
    version = stored_version(con, path)
    if version is not None and version > SCHEMA_VERSION:
        raise too_new(path, version)
    on_lake = is_lake(path)
    if on_lake and version == SCHEMA_VERSION and _lake_complete(con, tables):
        return version
    now = datetime.now(timezone.utc).isoformat()
    at = version
    con.execute("BEGIN TRANSACTION")
    try:
        if version is None:
            for sql in ddl(tables):
                con.execute(lake_sql(sql) if on_lake else sql)
            _set(con, schema_version=SCHEMA_VERSION, database_id=uuid.uuid4(), created_at=now)
        elif version < SCHEMA_VERSION:
            for at in range(version, SCHEMA_VERSION):
                _apply(con, STEPS[at])
            known = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'database_id'").fetchone()
            _set(con, schema_version=SCHEMA_VERSION, database_id=known[0] if known else uuid.uuid4(),
                 migrated_from=version, migrated_at=now)
        for sql in result_ddl(tables):  # a head added since the database was made: its table
            con.execute(sql)
        if on_lake:
            con.execute(CLAIMS_DDL)
        create_views(con, tables)  # views follow the code, not the schema version
        con.execute("COMMIT")
    except BaseException as exc:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT (a lake's conflict) ended the transaction already
        if not isinstance(exc, Exception):
            raise
        detail = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if version is None:
            raise MigrationError(f"{path}: creating the schema failed ({detail}); database unchanged") from exc
        if version == SCHEMA_VERSION:
            raise MigrationError(f"{path}: adding result tables or views failed ({detail}); database "
                                 "unchanged") from exc
        raise MigrationError(f"{path}: schema migration failed at version {at} -> {at + 1} ({detail}); "
                             f"database unchanged (still version {version})") from exc
    return version


def database_id(con: duckdb.DuckDBPyConnection) -> str | None:
    """The UUID the database got when it was created (or migrated to version 1)."""
    try:
        row = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'database_id'").fetchone()
    except duckdb.CatalogException:
        return None
    return row[0] if row else None
