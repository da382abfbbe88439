"""SQL views for analysts and the report, so "which results are current" and "did labels drift" are one
definition in the database, not re-derived in every query.

- `latest_<table>` (one per table in `schema.RESULT_FIELDS`): the rows of each head produced by that
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

Table and column names come from `schema.py` only; no value is ever formatted into SQL.
"""
from __future__ import annotations

import duckdb

from .schema import RESULT_FIELDS

# the model each head used last: ties (same load) share one model id
_LATEST_MODEL = "SELECT head, arg_max(model_id, updated_at) AS model_id FROM doc_state GROUP BY head"


def latest_view_sql(table: str) -> str:
    if table not in RESULT_FIELDS:
        raise ValueError(f"not a result table: {table}")
    return (f"SELECT t.*, r.started_at AS run_started_at, m.source AS model_source, m.revision AS model_revision\n"
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


def view_definitions() -> dict[str, str]:
    """View name -> SELECT; a table added to RESULT_FIELDS gets its `latest_` view here."""
    views = {f"latest_{table}": latest_view_sql(table) for table in RESULT_FIELDS}
    views["label_drift"] = LABEL_DRIFT_SQL
    return views


def create_views(con: duckdb.DuckDBPyConnection, temporary: bool = False) -> None:
    """Create or replace every view (idempotent); needs the tables of `ensure_schema`.

    `temporary` is for readers of a database made before the views (it works read-only); such a
    database may also predate a result table, whose `latest_` view is then left out.
    """
    kind = "TEMP VIEW" if temporary else "VIEW"
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for name, sql in view_definitions().items():
        if temporary and name.startswith("latest_") and name.removeprefix("latest_") not in tables:
            continue
        con.execute(f"CREATE OR REPLACE {kind} {name} AS {sql}")
