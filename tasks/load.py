"""Prefect tasks that write DuckDB: run bookkeeping and the single-writer shard loader."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from heads.registry import result_tables
from storage import db
from storage.staging import PackageQuarantined


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
    """Load a unit's package; one that can never load is quarantined and raises PackageQuarantined
    (not retried), so the flow reports the unit and goes on."""
    rows, failed, quarantined = db.load_or_quarantine(database, manifest, log=get_run_logger().error,
                                                      tables=result_tables())
    if quarantined:
        raise PackageQuarantined(quarantined)
    return rows, failed


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(database: str, run_id: str, config_path: str | None, corpus: str) -> None:
    db.start_run(database, run_id, config_path, corpus, tables=result_tables())


@task(name="finish-run", cache_policy=NO_CACHE)
def finish_run(database: str, run_id: str, status: str, docs_read: int, head_stats: dict,
               file_errors: list[str], error: str | None = None) -> None:
    db.finish_run(database, run_id, status, docs_read, head_stats, file_errors, error)


@task(name="recover-staged", cache_policy=NO_CACHE)
def recover_staged(database: str, run_id: str, staging: str | None = None) -> int:
    """Load what a killed run staged but did not load; returns result rows recovered."""
    return db.recover(database, run_id, staging, log=get_run_logger().error, tables=result_tables())
