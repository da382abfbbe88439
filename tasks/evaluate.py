"""Prefect task: evaluate a head against the corpus gold column and store the metrics."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.registry import result_tables
from storage.db import record_evaluations
from storage.evaluate import evaluate_head


@task(name="evaluate-gold", cache_policy=NO_CACHE)
def evaluate_gold(database: str, files: list[str], head_cfg, id_column: str, model_id: str,
                  run_id: str) -> dict[str, float]:
    rows = evaluate_head(database, files, head_cfg.name, head_cfg.task, id_column, head_cfg.gold_column, model_id)
    record_evaluations(database, [{**r, "head": head_cfg.name, "model_id": model_id, "source": "corpus",
                                   "run_id": run_id} for r in rows], tables=result_tables())
    return {r["metric"]: r["value"] for r in rows} | ({"n": rows[0]["n"]} if rows else {})
