"""Evaluate a head against a gold column of the corpus, from the results stored in DuckDB.

The comparison reads the latest stored result of every labelled document (not only the ones this
run inferred), so after an incremental run the metric still covers the whole labelled corpus.
Gold values are read from the corpus files with DuckDB (each file by its literal name, on a sandboxed
connection that can open only them and the results database); no document text enters SQL.
"""
from __future__ import annotations

from typing import Sequence

import duckdb

from core.metrics import accuracy, macro_f1
from core.names import quote

from .corpus import id_text
from .sandbox import literal_path, sandboxed_connection

GOLD_TASKS = {"classification"}


def _gold(con, files: Sequence[str], id_column: str, gold_column: str) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE gold AS SELECT " + id_text(quote(id_column)) + " AS doc_id, "
                + quote(gold_column) + " AS gold FROM read_parquet(?, union_by_name = true) WHERE "
                + quote(gold_column) + " IS NOT NULL", [[literal_path(f) for f in files]])


def classification_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Accuracy and macro F1 over (predicted, gold) label pairs: the same metrics training reports."""
    if not pairs:
        return {}
    pred, gold = [p for p, _ in pairs], [g for _, g in pairs]
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred)}


def evaluate_head(database: str, files: Sequence[str], head: str, task: str, id_column: str,
                  gold_column: str, model_id: str) -> list[dict]:
    """Metric rows {metric, value, n} for `head` against `gold_column` (results of `model_id` only)."""
    if task not in GOLD_TASKS:
        raise ValueError(f"no gold evaluation for {task} heads")
    con = sandboxed_connection(files, database)  # reads the corpus files and the results, nothing else
    try:
        _gold(con, files, id_column, gold_column)
        pairs = con.execute(
            "SELECT c.label, CAST(g.gold AS VARCHAR) FROM results.classifications c JOIN gold g USING (doc_id) "
            "WHERE c.head = ? AND c.model_id = ?", [head, model_id]).fetchall()
    except duckdb.Error as exc:
        raise ValueError(f"gold column {gold_column!r} cannot be read: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    metrics = classification_metrics(pairs)
    return [{"metric": m, "value": v, "n": len(pairs)} for m, v in metrics.items()]
