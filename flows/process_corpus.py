"""The corpus flow: plan incremental work, run every head over its units, load each package as it lands.

Orchestration only: reading, inference and writing live in tasks/, heads/ and storage/.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from storage.db import run_lock
from storage.plan import PlanHead
from storage.staging import staging_dir
from taskheads.config import load_config
from taskheads.preflight import preflight
from tasks.corpus import plan_corpus
from tasks.evaluate import evaluate_gold
from tasks.inference import infer_unit
from tasks.load import finish_run, load_shard, recover_staged, start_run
from tasks.models import resolve_model


@dataclass
class HeadSummary:
    task: str
    model_id: str = ""
    routed: int = 0  # corpus rows the head's `where` selects
    unchanged: int = 0  # skipped: same text and model as the stored result
    duplicates: int = 0  # skipped: the same id and text seen earlier in the corpus
    inferred: int = 0  # run through the model
    done: int = 0
    failed: int = 0
    rows: int = 0  # result rows loaded
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # against the gold column, when configured


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


@flow(name="process-corpus")
def process_corpus(config_path: str, corpus: str | None = None, database: str | None = None,
                   full: bool = False) -> dict:
    """Run every configured head over the corpus; only new or changed documents unless `full`."""
    started = time.perf_counter()
    cfg = load_config(config_path).with_overrides(corpus=corpus, database=database)
    preflight(cfg)
    log = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    s = RunSummary(run_id=run_id, database=cfg.database, heads={h.name: HeadSummary(task=h.task) for h in cfg.heads})
    with run_lock(cfg.database):
        start_run(cfg.database, run_id, cfg.source, cfg.corpus)
        try:
            s.recovered_rows = recover_staged(cfg.database, run_id)
            plan_heads = []
            for h in cfg.heads:
                model_id, extra_columns = resolve_model(h, cfg.database)
                s.heads[h.name].model_id = model_id
                plan_heads.append(PlanHead(h.name, h.where, extra_columns, model_id))
            files, usable, plans, s.docs_read, errors = plan_corpus(
                cfg.corpus, cfg.database, plan_heads, cfg.id_column, cfg.text_column, cfg.unit_docs, full)
            s.files, s.file_errors = len(files), list(errors)
            staging = str(staging_dir(cfg.database, run_id))
            for h in cfg.heads:
                hs, plan = s.heads[h.name], plans[h.name]
                hs.routed, hs.unchanged, hs.duplicates = plan.routed, plan.unchanged, plan.duplicates
                for unit in plan.units:
                    t0 = time.perf_counter()
                    try:
                        out = infer_unit(unit, h, cfg.id_column, cfg.text_column, run_id, hs.model_id, staging)
                        hs.rows += load_shard(cfg.database, out.manifest)[0]
                    except Exception as exc:  # the file changed or broke mid-run: name it, go on
                        s.file_errors.append(f"{unit.path}: {h.name} failed on rows {unit.unit_id} "
                                             f"({type(exc).__name__}: {str(exc).strip()[:200]})")
                        continue
                    finally:
                        hs.seconds += time.perf_counter() - t0
                    hs.inferred += out.inferred
                    hs.done += out.done
                    hs.failed += out.failed
                if h.gold_column:
                    hs.metrics = evaluate_gold(cfg.database, usable, h, cfg.id_column, hs.model_id, run_id)
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
    return asdict(s)
