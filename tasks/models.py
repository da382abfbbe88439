"""Prefect task: load each head's model once and record its lineage in `models`."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.loading import cached_head, model_identity
from storage.db import register_model


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(head_cfg, database: str, max_resident_models: int = 0) -> tuple[str, tuple[str, ...]]:
    """Returns the model id and the extra corpus columns the head reads (they join its fingerprint)."""
    head = cached_head(head_cfg, max_resident_models)
    identity = model_identity(head_cfg, head)
    register_model(database, identity)
    return identity["model_id"], tuple(head.needed_columns())
