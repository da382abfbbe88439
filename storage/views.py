"""SQL views for analysts and the report, so "which results are current" and "did labels drift" are one
definition in the database, not re-derived in every query.

- `latest_<table>` (one per result table the heads declare): the rows of each head produced by that
  head's most recent model (the `model_id` of its most recently updated `doc_state` row), with
  lineage columns `run_started_at`, `model_source`, `model_revision`. Rows an older model produced
  for documents the new model has not covered yet are left out; a document the new model tried and
  failed on keeps its last successful rows in view (a failed attempt never hides a good result).
- `label_drift`: per classification head and per run that still owns classification rows, the share
  of each label and its change since the head's previous such run (by `runs.started_at`).
  Result rows are *replaced* when a document is re-inferred, so a run's rows are the documents it
  (re)classified and that no later run re-classified: an incremental run that re-inferred three
  changed documents has a distribution over those three. A label of the previous run that is
  absent from a run appears with n = 0 and share 0, so disappearing labels show as drift too.

Table names come from the heads' declarations (core.tables.TABLE_NAME); no value is ever formatted into SQL.
"""
from __future__ import annotations

from typing import Iterable

import duckdb

from core.tables import TABLE_NAME, ResultTable

# the model each head used last: ties (same load) share one model id
_LATEST_MODEL = "SELECT head, arg_max(model_id, updated_at) AS model_id FROM doc_state GROUP BY head"


def latest_view_sql(table: str) -> str:
    if not TABLE_NAME.match(table):
        raise ValueError(f"not a result table name: {table!r}")
    return (f"SELECT t.* EXCLUDE (load_id), r.started_at AS run_started_at, m.source AS model_source, m.revision AS model_revision\n"
            f"FROM {table} t\n"
            f"JOIN ({_LATEST_MODEL}) latest ON latest.head = t.head\n"
            f"LEFT JOIN runs r ON r.run_id = t.run_id\n"
            f"LEFT JOIN models m ON m.model_id = t.model_id\n"
            # a document the latest model tried and failed keeps its last success in view
            f"WHERE t.model_id = latest.model_id OR EXISTS (SELECT 1 FROM failed_docs f WHERE f.head = t.head "
            f"AND f.doc_id = t.doc_id AND f.model_id = latest.model_id)")


LABEL_DRIFT_SQL = """
WITH counts AS (
  SELECT c.head, c.run_id, r.started_at AS run_started_at, c.label, count(*) AS n
  FROM classifications c JOIN runs r ON r.run_id = c.run_id
  GROUP BY c.head, c.run_id, r.started_at, c.label
), head_runs AS (
  SELECT head, run_id, run_started_at, docs,
         lag(run_id) OVER (PARTITION BY head ORDER BY run_started_at, run_id) AS prev_run_id
  FROM (SELECT head, run_id, run_started_at, sum(n) AS docs FROM counts GROUP BY head, run_id, run_started_at)
), shares AS (
  SELECT c.head, c.run_id, c.label, c.n, c.n / h.docs AS share
  FROM counts c JOIN head_runs h ON h.head = c.head AND h.run_id = c.run_id
), run_labels AS (  -- the run's labels plus those of the previous run
  SELECT DISTINCT h.head, h.run_id, s.label
  FROM head_runs h JOIN shares s ON s.head = h.head AND (s.run_id = h.run_id OR s.run_id = h.prev_run_id)
)
SELECT h.head, h.run_id, h.run_started_at, l.label,
       coalesce(cur.n, 0) AS n,
       coalesce(cur.share, 0.0) AS share,
       CASE WHEN h.prev_run_id IS NOT NULL THEN coalesce(prev.share, 0.0) END AS prev_share,
       coalesce(cur.share, 0.0)
         - CASE WHEN h.prev_run_id IS NOT NULL THEN coalesce(prev.share, 0.0) END AS delta
FROM head_runs h
JOIN run_labels l ON l.head = h.head AND l.run_id = h.run_id
LEFT JOIN shares cur ON cur.head = h.head AND cur.run_id = h.run_id AND cur.label IS NOT DISTINCT FROM l.label
LEFT JOIN shares prev ON prev.head = h.head AND prev.run_id = h.prev_run_id
                     AND prev.label IS NOT DISTINCT FROM l.label
"""


def view_definitions(tables: Iterable[str]) -> dict[str, str]:
    """View name -> SELECT for these result tables: each gets its `latest_` view; `label_drift` comes
    with `classifications`."""
    tables = list(tables)
    views = {f"latest_{table}": latest_view_sql(table) for table in tables}
    if "classifications" in tables:
        views["label_drift"] = LABEL_DRIFT_SQL
    return views


def create_views(con: duckdb.DuckDBPyConnection, tables: Iterable[ResultTable | str],
                 temporary: bool = False) -> None:
    """Create or replace the views of these result tables (idempotent); needs the tables themselves."""
    kind = "TEMP VIEW" if temporary else "VIEW"
    names = [t.name if isinstance(t, ResultTable) else t for t in tables]
    for name, sql in view_definitions(names).items():
        con.execute(f"CREATE OR REPLACE {kind} {name} AS {sql}")


# storage's own tables that also carry head, doc_id, run_id, model_id
_NOT_RESULTS = ("doc_state", "failed_docs")


def result_tables_in(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The result tables a database holds (whatever heads wrote them): tables with the key and lineage
    columns, but storage's own. For readers, who need no head declarations."""
    rows = con.execute(
        "SELECT c.table_name FROM duckdb_columns() c JOIN duckdb_tables() t USING (database_name, schema_name, "
        "table_name) WHERE c.database_name = current_database() AND c.schema_name = 'main' "
        "AND c.column_name IN ('head', 'doc_id', 'run_id', 'model_id') GROUP BY c.table_name "
        "HAVING count(DISTINCT c.column_name) = 4 ORDER BY c.table_name").fetchall()
    return [r[0] for r in rows if r[0] not in _NOT_RESULTS and TABLE_NAME.match(r[0])]


def reader_views(con: duckdb.DuckDBPyConnection) -> None:
    """Temporary views for a reader of a database made before the views (works read-only): one per
    result table it holds."""
    create_views(con, result_tables_in(con), temporary=True)
