"""The corpus flow: plan incremental work, run the heads level by level, load each package as it lands.

Orchestration only: reading, inference and writing live in tasks/, heads/ and storage/.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from core.progress import emit
from pipeline.config import load_config
from pipeline.preflight import preflight
from storage.db import run_lock
from storage.plan import PlanHead
from storage.staging import staging_dir
from tasks.corpus import plan_corpus
from tasks.evaluate import evaluate_gold
from tasks.inference import infer_unit
from tasks.load import finish_run, load_shard, recover_staged, start_run
from tasks.models import register_models, resolve_model

from .artifact import publish_run_artifact


@dataclass
class HeadSummary:
    task: str
    model_id: str = ""
    routed: int = 0  # corpus rows the head's `where` selects
    unchanged: int = 0  # skipped: same text and model as the stored result
    duplicates: int = 0  # skipped: the same id and text seen earlier in the corpus
    skipped_failed: int = 0  # skipped: failed before on this text and model (terminal, or out of attempts)
    retried: int = 0  # of inferred: failed before on this text and model, tried again
    inferred: int = 0  # run through the model
    done: int = 0
    failed: int = 0
    rows: int = 0  # result rows loaded
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # against the gold column, when configured
    workers: list[str] = field(default_factory=list)  # host:pid of the processes that ran its units
    model_failed: int = 0  # of inferred: failed in encode, forward or decode
    reasons: dict[str, int] = field(default_factory=dict)  # model-stage failure reasons, most common first


@dataclass
class RunSummary:
    run_id: str
    database: str
    status: str = "running"
    docs_read: int = 0
    files: int = 0
    recovered_rows: int = 0
    file_errors: list[str] = field(default_factory=list)
    heads: dict[str, HeadSummary] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def head_stats(self) -> dict:
        return {name: asdict(h) for name, h in self.heads.items()}


@flow(name="process-corpus", task_runner=ThreadPoolTaskRunner(max_workers=4))
def process_corpus(config_path: str, corpus: str | None = None, database: str | None = None,
                   full: bool = False, retry_failed: bool = False) -> dict:
    """Run every configured head over the corpus; only new or changed documents unless `full`.

    Documents that failed before are tried again when the fault was transient (up to
    `max_attempts`), or all of them with `retry_failed`.

    Heads run level by level (a head after the heads whose results it reads); the units of one level
    are submitted together, so independent heads run concurrently (on Dask workers with
    `--runner dask`), and each finished unit is loaded here, by the one process that writes DuckDB.
    """
    started = time.perf_counter()
    cfg = load_config(config_path).with_overrides(corpus=corpus, database=database)
    preflight(cfg)
    log = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    s = RunSummary(run_id=run_id, database=cfg.database, heads={h.name: HeadSummary(task=h.task) for h in cfg.heads})
    plan_heads, identities = _plan_heads(cfg, s)  # every model loads before anything is written
    with run_lock(cfg.database):
        start_run(cfg.database, run_id, cfg.source, cfg.corpus)
        try:
            register_models(cfg.database, identities)
            s.recovered_rows = recover_staged(cfg.database, run_id, cfg.staging)
            staging = staging_dir(cfg.database, run_id, cfg.staging)
            for depth, level in enumerate(cfg.levels()):
                files, usable, plans, docs_read, errors = plan_corpus(
                    cfg.corpus, cfg.database, [plan_heads[h.name] for h in level], cfg.id_column, cfg.text_column,
                    cfg.unit_docs, full, str(staging / "inputs"), cfg.max_attempts, retry_failed)
                if depth == 0:
                    s.files, s.docs_read = len(files), docs_read
                s.file_errors += [e for e in errors if e not in s.file_errors]
                _run_level(cfg, level, plans, s, str(staging))
                _check_heads(level, s)
                for h in level:
                    if h.gold_column:
                        s.heads[h.name].metrics = evaluate_gold(cfg.database, usable, h, cfg.id_column,
                                                                s.heads[h.name].model_id, run_id)
            for e in s.file_errors:
                log.error(e)
            s.status = "completed_with_errors" if s.file_errors else "completed"
        except BaseException as exc:
            s.status = "failed"
            finish_run(cfg.database, run_id, "failed", s.docs_read, s.head_stats(), s.file_errors,
                       f"{type(exc).__name__}: {exc}")
            raise
        s.wall_seconds = time.perf_counter() - started
        finish_run(cfg.database, run_id, s.status, s.docs_read, s.head_stats(), s.file_errors)
    summary = asdict(s)
    publish_run_artifact(summary)
    return summary


def _plan_heads(cfg, s: RunSummary) -> tuple[dict[str, PlanHead], list[dict]]:
    """Load each head once here for its model identity, then describe what planning needs of it.

    Writes nothing: a head that cannot run (e.g. untrained task weights) stops the run before its
    `runs` row exists. Returns the plan heads and the identities to register in `models`."""
    resolved = {h.name: resolve_model(h, cfg.max_resident_models) for h in cfg.heads}
    for name, (identity, _) in resolved.items():
        s.heads[name].model_id = identity["model_id"]
    plans = {h.name: PlanHead(h.name, cfg.routing(h), resolved[h.name][1], resolved[h.name][0]["model_id"],
                              upstream=tuple((u, cfg.head(u).result_table) for u in cfg.upstream(h)), input=h.input)
             for h in cfg.heads}
    return plans, [identity for identity, _ in resolved.values()]


def _run_level(cfg, level, plans, s: RunSummary, staging: str) -> None:
    """Submit every unit of the level's heads, load each as it finishes (in this process)."""
    t0 = time.perf_counter()
    pending = {}
    for h in level:
        hs, plan = s.heads[h.name], plans[h.name]
        hs.routed, hs.unchanged, hs.duplicates = plan.routed, plan.unchanged, plan.duplicates
        hs.retried, hs.skipped_failed = plan.retried, plan.skipped_failed
        emit("head_planned", head=h.name, units=len(plan.units), docs=plan.to_infer + plan.conflicts)
        for unit in plan.units:
            future = infer_unit.submit(unit, h, cfg.id_column, cfg.text_column, s.run_id, hs.model_id, staging,
                                       cfg.max_resident_models)
            pending[future] = (h, unit)
    log = get_run_logger()
    for future in as_completed(list(pending)):
        h, unit = pending[future]
        hs = s.heads[h.name]
        try:
            out = future.result()
            hs.rows += load_shard(cfg.database, out.manifest)[0]
        except Exception as exc:  # a bug, a broken model, a file changed mid-run: loud, and the rest goes on
            log.error(f"head {h.name}, unit {unit.unit_id} failed; its documents stay as they were and are "
                      "retried next run", exc_info=exc)
            s.file_errors.append(f"{unit.source or unit.path}: {h.name} failed on rows {unit.unit_id} "
                                 f"({type(exc).__name__}: {str(exc).strip()[:200]})")
            emit("unit_done", head=h.name, docs=len(unit.rows) + len(unit.refused), failed=0)
            continue
        finally:
            hs.seconds = time.perf_counter() - t0  # the head's share of the level: until its last unit
        hs.inferred += out.inferred
        hs.done += out.done
        hs.failed += out.failed
        hs.model_failed += out.model_failed
        for reason, n in out.reasons:
            hs.reasons[reason] = hs.reasons.get(reason, 0) + n
        if out.worker not in hs.workers:
            hs.workers.append(out.worker)
        emit("unit_done", head=h.name, docs=len(unit.rows) + len(unit.refused), failed=out.failed)


def _check_heads(level, s: RunSummary) -> None:
    """A head whose every inferred document failed is broken, not unlucky: report it like a failed unit."""
    for h in level:
        hs = s.heads[h.name]
        hs.reasons = dict(sorted(hs.reasons.items(), key=lambda kv: -kv[1])[:3])
        if hs.inferred and hs.model_failed == hs.inferred:
            reason, n = next(iter(hs.reasons.items()), ("unknown", hs.inferred))
            s.file_errors.append(f"{h.name}: all {hs.inferred} documents failed; most common reason ({n}): {reason}")
