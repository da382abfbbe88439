"""Prefect task: evaluate a head against the corpus gold column and stage the metrics for the loader."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.db import stage_write
from storage.evaluate import evaluate_head


@task(name="evaluate-gold", cache_policy=NO_CACHE)
def evaluate_gold(database: str, files: list[str], head_cfg, id_column: str, model_id: str,
                  run_id: str, staging: str | None = None) -> dict[str, float]:
    """Metrics from the stored results (read-only, beside analysts' connections); the rows are written
    through the staging folder like every other write of the run."""
    rows = evaluate_head(database, files, head_cfg.name, head_cfg.task, id_column, head_cfg.gold_column, model_id)
    stage_write(database, run_id, "evaluations", {"rows": [{**r, "head": head_cfg.name, "model_id": model_id,
                                                            "source": "corpus", "run_id": run_id} for r in rows]},
                staging)
    return {r["metric"]: r["value"] for r in rows} | ({"n": rows[0]["n"]} if rows else {})
