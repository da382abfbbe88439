"""Read-only queries behind the HTML report and the per-run Prefect artifact.

Every function opens the database read-only (waiting while a load holds the lock) and returns plain
Python: lists of dicts, or a dict of them. Values are always bound as parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

from .db import connect
from .views import reader_views


@contextmanager
def _reader(database: str):
    """A read-only connection with the views; a database made before they existed gets temporary ones."""
    con = connect(database, read_only=True)
    try:
        if not con.execute("SELECT 1 FROM duckdb_views() WHERE view_name = 'label_drift' AND NOT temporary").fetchone():
            reader_views(con)
        yield con
    finally:
        con.close()


def _rows(con, sql: str, params: Sequence[Any] = ()) -> list[dict]:
    cur = con.execute(sql, list(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def fetch(database: str, sql: str, params: Sequence[Any] = ()) -> list[dict]:
    with _reader(database) as con:
        return _rows(con, sql, params)


RUNS_SQL = """
SELECT run_id, started_at, finished_at, status, docs_read, docs_inferred, docs_skipped, docs_failed,
       epoch(finished_at - started_at) AS wall_seconds,
       CASE WHEN epoch(finished_at - started_at) > 0
            THEN docs_inferred / epoch(finished_at - started_at) END AS docs_per_second
FROM runs ORDER BY started_at, run_id
"""


def runs_overview(database: str) -> list[dict]:
    """One row per run, oldest first; throughput = inferred (head, document) pairs per wall second."""
    return fetch(database, RUNS_SQL)


def label_distribution(database: str) -> list[dict]:
    """`label_drift` rows: head, run_id, run_started_at, label, n, share, prev_share, delta."""
    return fetch(database, "SELECT * FROM label_drift ORDER BY head, run_started_at, run_id, label")


def top_entities(database: str, limit: int = 10) -> list[dict]:
    """The most frequent (entity_group, text) pairs over all current entity rows."""
    return fetch(database, "SELECT entity_group, text, count(*) AS count FROM entities GROUP BY ALL "
                           "ORDER BY count DESC, entity_group, text LIMIT ?", [limit])


def top_entities_by_group(database: str, limit: int = 10) -> dict[str, list[dict]]:
    """The `limit` most frequent texts of each entity group."""
    rows = fetch(database, "SELECT entity_group, text, count(*) AS count FROM entities "
                           "GROUP BY entity_group, text QUALIFY row_number() OVER (PARTITION BY entity_group ORDER BY count(*) DESC, text) <= ? "
                           "ORDER BY entity_group, count DESC, text", [limit])
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["entity_group"], []).append(r)
    return out


_NO_ANSWER = "count(*) FILTER (WHERE answer IS NULL OR answer = '')"


def qa_no_answer_rate(database: str) -> list[dict]:
    """Per run and QA head: answers stored, of which no answer (NULL or empty), and the rate."""
    return fetch(database, f"""
        SELECT a.run_id, r.started_at AS run_started_at, a.head, count(*) AS answers,
               {_NO_ANSWER} AS no_answer, {_NO_ANSWER} / count(*) AS no_answer_rate
        FROM answers a LEFT JOIN runs r ON r.run_id = a.run_id
        GROUP BY ALL ORDER BY run_started_at, a.run_id, a.head""")


def failures_by_stage(database: str) -> list[dict]:
    """Per run, head and stage: how many (head, document) rows failed."""
    return fetch(database, """
        SELECT f.run_id, r.started_at AS run_started_at, f.head, f.stage, count(*) AS failed
        FROM failed_docs f LEFT JOIN runs r ON r.run_id = f.run_id
        GROUP BY ALL ORDER BY run_started_at, f.run_id, f.head, f.stage""")


def run_digest(database: str, run_id: str, examples: int = 5) -> dict:
    """What one run wrote, for its artifact: labels, entity groups, QA no-answer rate, failures."""
    with _reader(database) as con:
        labels: dict[str, list[dict]] = {}
        for r in _rows(con, "SELECT head, label, n, share, prev_share, delta FROM label_drift WHERE run_id = ? "
                            "ORDER BY head, n DESC, label", [run_id]):
            labels.setdefault(r.pop("head"), []).append(r)
        entities = _rows(con, "SELECT head, entity_group, count(*) AS n FROM entities WHERE run_id = ? "
                              "GROUP BY ALL ORDER BY head, n DESC, entity_group", [run_id])
        qa = _rows(con, f"SELECT head, count(*) AS answers, {_NO_ANSWER} AS no_answer, "
                        f"{_NO_ANSWER} / count(*) AS no_answer_rate FROM answers WHERE run_id = ? "
                        "GROUP BY head ORDER BY head", [run_id])
        failures = _rows(con, """
            SELECT head, stage, count(*) AS failed,
                   list(DISTINCT error ORDER BY error)[1:?] AS examples
            FROM failed_docs WHERE run_id = ? GROUP BY head, stage ORDER BY head, stage""", [examples, run_id])
    return {"run_id": run_id, "labels": labels, "entities": entities, "qa": qa, "failures": failures}
