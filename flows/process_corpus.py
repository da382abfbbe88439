"""The corpus flow: plan units, run every head over every unit, load each shard as it lands.

Orchestration only: reading, inference and writing live in tasks/, heads/ and storage/.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from taskheads.config import load_config
from taskheads.preflight import preflight
from tasks.corpus import plan_corpus
from tasks.inference import infer_unit
from tasks.load import finish_run, load_shard, start_run
from tasks.models import resolve_model
from storage.staging import staging_dir


@dataclass
class HeadSummary:
    task: str
    model_id: str = ""
    routed: int = 0
    done: int = 0
    failed: int = 0
    rows: int = 0
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_id: str
    database: str
    status: str = "running"
    docs_read: int = 0
    files: int = 0
    file_errors: list[str] = field(default_factory=list)
    heads: dict[str, HeadSummary] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@flow(name="process-corpus")
def process_corpus(config_path: str, corpus: str | None = None, database: str | None = None) -> dict:
    started = time.perf_counter()
    cfg = load_config(config_path).with_overrides(corpus=corpus, database=database)
    preflight(cfg)
    log = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    summary = RunSummary(run_id=run_id, database=cfg.database,
                         heads={h.name: HeadSummary(task=h.task) for h in cfg.heads})
    start_run(cfg.database, run_id, cfg.source, cfg.corpus)
    try:
        for h in cfg.heads:
            summary.heads[h.name].model_id = resolve_model(h, cfg.database)
        files, units, file_errors = plan_corpus(cfg.corpus, cfg.unit_docs, cfg.id_column, cfg.text_column)
        summary.files, summary.file_errors = len(files), list(file_errors)
        for e in file_errors:
            log.error(e)
        staging = str(staging_dir(cfg.database, run_id))
        for unit in units:
            try:
                for h in cfg.heads:
                    t0 = time.perf_counter()
                    out = infer_unit(unit, h, cfg.id_column, cfg.text_column, run_id,
                                     summary.heads[h.name].model_id, staging)
                    loaded, _ = load_shard(cfg.database, out.manifest)
                    hs = summary.heads[h.name]
                    hs.routed += out.routed
                    hs.done += out.done
                    hs.failed += out.failed
                    hs.rows += loaded
                    hs.seconds += time.perf_counter() - t0
                summary.docs_read += unit.stop - unit.start
            except Exception as exc:  # the file changed or broke mid-run: name it, go on
                msg = f"{unit.path}: rows {unit.start}-{unit.stop} failed ({type(exc).__name__}: {exc})"
                summary.file_errors.append(msg)
                log.error(msg)
        summary.status = "completed_with_errors" if summary.file_errors else "completed"
    except BaseException as exc:
        summary.status = "failed"
        finish_run(cfg.database, run_id, "failed", summary.docs_read,
                   sum(h.failed for h in summary.heads.values()), summary.file_errors, f"{type(exc).__name__}: {exc}")
        raise
    summary.wall_seconds = time.perf_counter() - started
    finish_run(cfg.database, run_id, summary.status, summary.docs_read,
               sum(h.failed for h in summary.heads.values()), summary.file_errors)
    return summary.to_dict()
