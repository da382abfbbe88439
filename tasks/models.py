"""Prefect tasks: load each head's model once (its lineage), then record that lineage in `models`."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.loading import cached_head, model_identity
from storage.db import register_model


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(head_cfg, max_resident_models: int = 0) -> tuple[dict, tuple[str, ...]]:
    """The model's identity and the extra corpus columns the head reads (they join its fingerprint).

    Writes nothing: a head that cannot run (ModelLoadError, UntrainedHeadError) stops the run here,
    before the run touches the database."""
    head = cached_head(head_cfg, max_resident_models)
    return model_identity(head_cfg, head), tuple(head.needed_columns())


@task(name="register-models", cache_policy=NO_CACHE)
def register_models(database: str, identities: list[dict]) -> None:
    for identity in identities:
        register_model(database, identity)
