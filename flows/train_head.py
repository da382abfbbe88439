"""The training flow: labelled Parquet rows -> a fine-tuned head folder (+ metrics in DuckDB).

Orchestration only: reading rows lives in storage/, training in training/, recording in tasks/.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from storage.training_data import read_rows
from tasks.training import record_training_metrics, train_head_task


@flow(name="train-head")
def train_head(task: str, base_model: str, out_dir: str, train_path: str, eval_path: str,
               database: str | None = None, head: str = "trained", epochs: float = 2, lr: float = 5e-5,
               batch_size: int = 16, max_length: int | None = None, seed: int = 0, progress: bool = True,
               head_params: dict | None = None) -> dict:
    """Fine-tune `base_model` into a `task` head (classification | ner | qa) saved in `out_dir`.

    Returns the held-out metrics; with `database`, they are also stored in `evaluations`
    (source "training") under the model id of the saved folder.
    """
    log = get_run_logger()
    train, eval_rows = read_rows(train_path), read_rows(eval_path)
    options = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "progress": progress}
    if max_length is not None:
        options["max_length"] = max_length
    if task == "ner" and head_params:
        options["decode_params"] = dict(head_params)  # held-out F1 decoded as corpus runs will decode
    metrics = train_head_task(task, base_model, out_dir, train, eval_rows, **options)
    log.info("trained %s head %r on %d rows: %s", task, head, len(train), metrics)
    if database:
        run_id = str(flow_run.get_id() or "local")
        metrics["model_id"] = record_training_metrics(database, head, task, out_dir, metrics, run_id, head_params)
        metrics["run_id"] = run_id
    return metrics
