"""Prefect tasks that write DuckDB: every write of a run is staged, then applied by the one loader.

A run stages its `runs` row, models, recovery, evaluations and finish as ops beside its load packages;
`load-staged` applies whatever waits in the first transactions that get the file, so a reader holding
the file (a notebook, a BI tool) delays writes but never fails the run.
"""
from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from heads.registry import result_tables
from storage import db


def _transient(task, task_run, state) -> bool:
    """Retry when the database was busy or the disk hiccuped; anything else is terminal."""
    try:
        state.result()
    except (db.DatabaseBusy, OSError):
        return True
    except Exception:
        return False
    return False


@task(name="load-shard", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 4, 10],
      retry_condition_fn=_transient)
def load_shard(database: str, manifest: str) -> tuple[int, int]:
    """Load one package now (outside a run: the staged loader below is what runs use); one that can never
    load is quarantined and raises PackageQuarantined (not retried)."""
    from storage.staging import PackageQuarantined

    rows, failed, quarantined = db.load_or_quarantine(database, manifest, log=get_run_logger().error,
                                                      tables=result_tables())
    if quarantined:
        raise PackageQuarantined(quarantined)
    return rows, failed


@task(name="wait-readable", cache_policy=NO_CACHE)
def wait_readable(database: str, wait_seconds: float) -> None:
    """Planning reads beside analysts' read-only connections; a read-write holder keeps even reading out:
    wait for it up to `wait_seconds`, then DatabaseLocked (the CLI exits 75)."""
    db.wait_readable(database, wait_seconds)


@task(name="create-database", cache_policy=NO_CACHE)
def create_database(database: str, data_path: str | None = None) -> None:
    """Make a new results database with its schema (no other process can hold a file not made yet);
    `data_path`: a new lake's Parquet folder."""
    db.ensure_schema(database, tables=result_tables(), data_path=data_path)


@task(name="stage-run-start", cache_policy=NO_CACHE)
def stage_run_start(database: str, run_id: str, config_path: str | None, corpus: str, identities: list[dict],
                    staging: str | None = None) -> None:
    """Stage the run's `runs` row, its models (and their legacy-id mapping) and the recovery of dead runs
    (under the run lock, so any other run still 'running' is dead)."""
    db.stage_write(database, run_id, "start", {"config_path": config_path, "corpus": corpus}, staging)
    for identity in identities:
        db.stage_write(database, run_id, "model", {"model": identity}, staging)
    db.stage_write(database, run_id, "recover", {}, staging)


@task(name="load-staged", cache_policy=NO_CACHE)
def load_staged(database: str, run_id: str | None, staging: str | None = None, wait_seconds: float = 0.0) -> dict:
    """Apply what waits in the staging folder if the file can be had within `wait_seconds` (else nothing);
    returns storage.db.Loaded as a dict."""
    return asdict(db.load_staged(database, tables=result_tables(), run_id=run_id, staging=staging,
                                 wait_seconds=wait_seconds, log=get_run_logger().error))


@task(name="stage-evaluation", cache_policy=NO_CACHE)
def stage_evaluation(database: str, run_id: str, files: list[str], head_cfg, id_column: str, model_id: str,
                     staging: str | None = None) -> None:
    """Stage the head's evaluation against its gold column: computed by the loader once the head's
    packages are loaded (it reads the stored results), then written."""
    db.stage_write(database, run_id, "evaluate", {"files": list(files), "head": head_cfg.name, "task": head_cfg.task,
                                                  "id_column": id_column, "gold_column": head_cfg.gold_column,
                                                  "model_id": model_id}, staging)


@task(name="stage-run-finish", cache_policy=NO_CACHE)
def stage_run_finish(database: str, run_id: str, status: str, docs_read: int, head_stats: dict,
                     file_errors: list[str], error: str | None = None, staging: str | None = None) -> None:
    db.stage_write(database, run_id, "finish", {"status": status, "docs_read": docs_read, "head_stats": head_stats,
                                                "file_errors": list(file_errors), "error": error}, staging)
