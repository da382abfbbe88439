"""Prefect task over the corpus: check files and plan the incremental work per head."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.corpus import check_files, corpus_files
from storage.plan import PlanHead, open_plan, preview_open


@task(name="plan-corpus", cache_policy=NO_CACHE)
def plan_corpus(corpus: str, database: str, heads: list[PlanHead], id_column: str, text_column: str,
                unit_docs: int, full: bool, inputs_dir: str | None = None, max_attempts: int = 3,
                retry_failed: bool = False, spill_dir: str | None = None, memory_limit: str | None = None):
    """Returns (files, usable files, the open LevelPlan, one error line per unusable file); the plan's
    units are read as they are submitted (close it after the level)."""
    files = corpus_files(corpus)
    good, errors = check_files(files, [id_column, text_column])
    plan = open_plan(database, good, heads, id_column, text_column, unit_docs, full, inputs_dir, max_attempts,
                     retry_failed, memory_limit=memory_limit, temp_directory=spill_dir)
    return files, good, plan, errors + plan.errors


@task(name="preview-corpus", cache_policy=NO_CACHE)
def preview_corpus(corpus: str, database: str, levels: list[list[PlanHead]], id_column: str, text_column: str,
                   unit_docs: int, full: bool, max_attempts: int = 3, retry_failed: bool = False,
                   spill_dir: str | None = None, memory_limit: str | None = None) -> list:
    """Plan every level against the database as it is, reading only: per level (files, usable files,
    plans per head, rows scanned, error lines, the open LevelPlan of the first level else None), or
    None for a level whose upstream results cannot be read yet (its heads are planned after their
    upstream loads) or that cannot be planned before the run migrates the database: those heads
    load and plan as before. The first level's plan stays open (close it): when nothing changes
    the database before the level runs, it is the level's plan, so the corpus is not planned twice."""
    files = corpus_files(corpus)
    good, errors = check_files(files, [id_column, text_column])
    levels_out = preview_open(database, good, levels, id_column, text_column, unit_docs, full, max_attempts,
                              retry_failed, memory_limit=memory_limit, temp_directory=spill_dir)
    return [None if known is None else (files, good, known[0], known[1], errors + known[2], known[3])
            for known in levels_out]
