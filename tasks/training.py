"""Prefect tasks: fine-tune one head from a base encoder and store its held-out metrics."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from heads.loading import load_head, model_identity
from heads.registry import result_tables
from pipeline.config import HeadConfig
from storage.db import record_evaluations

# the metrics each task's trainer returns that go to `evaluations`
EVAL_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "ner": ("entity_precision", "entity_recall", "entity_f1"),
    "qa": ("exact_match", "f1"),
}

DEFAULT_PARAMS = {"qa": {"question_column": "question"}}


def _trainer(task_name: str):
    from training import train_classifier, train_qa, train_token_classifier

    trainers = {"classification": train_classifier, "ner": train_token_classifier, "qa": train_qa}
    if task_name not in trainers:
        raise ValueError(f"cannot train task {task_name!r}; trainable: {', '.join(sorted(trainers))}")
    return trainers[task_name]


@task(name="train-head", cache_policy=NO_CACHE)
def train_head_task(task_name: str, base_model: str, out_dir: str, train: list[dict], eval: list[dict],
                    **options) -> dict:
    """Train and save; returns the trainer's metrics. Options go to the trainer (epochs, lr, ...)."""
    return _trainer(task_name)(base_model, out_dir, train, eval, **options)


@task(name="record-training-metrics", cache_policy=NO_CACHE)
def record_training_metrics(database: str, head: str, task_name: str, out_dir: str, metrics: dict,
                            run_id: str | None, head_params: dict | None = None) -> str:
    """Store the held-out metrics under the model id a corpus run of the saved folder would get.

    The model id covers the head's params too, so pass the params of the corpus config that will
    run this folder (a qa head needs questions: the default is `question_column = "question"`).
    """
    params = dict(head_params or DEFAULT_PARAMS.get(task_name, {}))
    cfg = HeadConfig(name=head, task=task_name, model=out_dir, params=params)
    model_id = model_identity(cfg, load_head(head, task_name, out_dir, params=params, device="cpu"))["model_id"]
    rows = [{"head": head, "model_id": model_id, "metric": m, "value": metrics[m], "n": metrics["n"],
             "source": "training", "run_id": run_id} for m in EVAL_METRICS[task_name]]
    record_evaluations(database, rows, tables=result_tables())
    return model_id
