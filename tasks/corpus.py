"""Prefect tasks over the corpus: plan work units."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.corpus import corpus_files, plan_units


@task(name="plan-corpus", cache_policy=NO_CACHE)
def plan_corpus(corpus: str, unit_docs: int, id_column: str, text_column: str):
    """List the corpus files and split them into units; bad files come back as error lines."""
    files = corpus_files(corpus)
    units, errors = plan_units(files, unit_docs, [id_column, text_column])
    return files, units, errors
