"""Prefect task over the corpus: check files and plan the incremental work per head."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.corpus import check_files, corpus_files
from storage.plan import PlanHead, plan_work


@task(name="plan-corpus", cache_policy=NO_CACHE)
def plan_corpus(corpus: str, database: str, heads: list[PlanHead], id_column: str, text_column: str,
                unit_docs: int, full: bool, inputs_dir: str | None = None, max_attempts: int = 3,
                retry_failed: bool = False):
    """Returns (files, usable files, plans per head, rows scanned, one error line per unusable file)."""
    files = corpus_files(corpus)
    good, errors = check_files(files, [id_column, text_column])
    plans, rows, plan_errors = plan_work(database, good, heads, id_column, text_column, unit_docs, full, inputs_dir,
                                         max_attempts, retry_failed)
    return files, good, plans, rows, errors + plan_errors
