"""Prefect tasks: each head's model identity (its lineage, from the files; tasks.load stages it for
`models`) and the models a run needs loaded before it writes."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.loading import cached_head, model_identity
from heads.registry import head_class


@task(name="identify-models", cache_policy=NO_CACHE)
def identify_models(head_cfgs) -> list[tuple[dict, tuple[str, ...]]]:
    """Per head: its model identity and the extra corpus columns it reads (they join its fingerprint),
    from the model's files and params alone: no model is loaded, so a rerun with nothing to do costs
    no load. A head whose files cannot be found raises IdentityError (a ModelLoadError) naming it."""
    out = []
    for h in head_cfgs:
        identity = model_identity(h)
        out.append((identity, tuple(head_class(h.task).columns_for(identity["params"]))))
    return out


@task(name="load-models", cache_policy=NO_CACHE)
def load_models(head_cfgs, max_resident_models: int = 0) -> None:
    """Load the heads that have work, in this process (once: its units reuse them), before the run
    writes: a head that cannot run (ModelLoadError, UntrainedHeadError) stops the run here."""
    for h in head_cfgs:
        cached_head(h, max_resident_models)
