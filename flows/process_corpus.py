"""The corpus flow: plan incremental work, run the heads level by level, load packages as they land.

Orchestration only: reading, inference and writing live in tasks/, heads/ and storage/.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import RunType
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from core.errors import ConfigError
from core.memory import hand_back_freed, keep_memory_flat
from core.progress import emit
from pipeline.config import load_config, parse_config
from pipeline.preflight import preflight
from storage.db import exists as db_exists, run_lock
from storage.lake import is_lake
from storage.plan import PlanHead
from storage.staging import staging_dir
from tasks.corpus import plan_corpus, preview_corpus
from tasks.evaluate import evaluate_gold
from tasks.inference import infer_unit, shard_id_for
from tasks.load import create_database, load_staged, stage_evaluation, stage_run_finish, stage_run_start, wait_readable
from tasks.models import identify_models, load_models

from .artifact import ProgressArtifacts, publish_run_artifact


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
    backend: str = "torch"  # what ran the model (heads/backends); "auto" resolved
    backend_auto: bool = False  # chosen by `backend = "auto"`


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
    config: str | None = None  # the config file, if any (the pending-load line names it)
    pending_packages: int = 0  # load packages still staged at the end: another process held the file
    deferred: list[str] = field(default_factory=list)  # heads left to the next run: upstream results not loaded

    def head_stats(self) -> dict:
        return {name: asdict(h) for name, h in self.heads.items()}


def run_name() -> str:
    """`<config stem>-<UTC time>`: runs of one config read as one series in the Prefect UI."""
    config = flow_run.parameters.get("config_path")
    stem = Path(config).stem if isinstance(config, (str, Path)) else "pipeline"
    return f"{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


@flow(name="process-corpus", flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=4))
def process_corpus(config_path: str | None = None, corpus: str | None = None, database: str | None = None,
                   full: bool = False, retry_failed: bool = False, config: dict | None = None) -> dict:
    """Run every configured head over the corpus; only new or changed documents unless `full`.

    The config is the TOML file `config_path`, or `config`: the same keys as a dict, relative paths
    from the working directory (`taskheads.run` passes them resolved; `config_path` then only
    names the file it came from, if any, for lineage).

    Documents that failed before are tried again when the fault was transient (up to
    `max_attempts`), or all of them with `retry_failed`.

    Heads run level by level (a head after the heads whose results it reads); the units of one level's
    heads are submitted in turns through a window of `max_units_in_flight`, so independent heads run
    concurrently (on Dask workers with `--runner dask`), and each finished unit is loaded here, by the
    one process that writes DuckDB. Every write of the run is staged first and loaded when the file can
    be had, so a reader holding it delays loads (up to `load_wait`, then they wait on disk for
    `taskheads load` or the next run: `completed_pending_load`) and never fails the run. Model ids
    come from the files: a model loads only for a head that has work (a rerun with nothing to do loads
    none).
    """
    started = time.perf_counter()
    keep_memory_flat()
    if config is not None:
        cfg = parse_config(config, Path.cwd(), source=config_path)
    elif config_path is not None:
        cfg = load_config(config_path)
    else:
        raise ConfigError("process_corpus: needs config_path (a TOML file) or config (a dict)")
    cfg = cfg.with_overrides(corpus=corpus, database=database)
    preflight(cfg)
    log = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    s = RunSummary(run_id=run_id, database=cfg.database, config=cfg.source,
                   heads={h.name: HeadSummary(task=h.task) for h in cfg.heads})
    plan_heads, identities = _plan_heads(cfg, s)  # from the models' files: nothing loaded yet
    levels = [list(level) for level in cfg.levels()]
    preview: list = []
    # planning reads beside analysts' read-only connections; a read-write holder keeps it out (exit 75)
    wait_readable(cfg.database, cfg.load_wait)
    if not db_exists(cfg.database):  # a first run: every head has work; load them before any write
        load_models(list(cfg.heads), cfg.max_resident_models)
        if is_lake(cfg.database):  # made before the run's .alive lock, which may live in a folder named by its id
            create_database(cfg.database, cfg.data_path)
    with run_lock(cfg.database, run_id, cfg.staging):
        if db_exists(cfg.database):
            # what each head has to do, read-only; only heads with work load their model (here, once per
            # process: units on the thread runner reuse it), before the run writes anything
            preview = preview_corpus(cfg.corpus, cfg.database, [[plan_heads[h.name] for h in level] for level in levels],
                                     cfg.id_column, cfg.text_column, cfg.unit_docs, full, cfg.max_attempts,
                                     retry_failed, str(staging_dir(cfg.database, run_id, cfg.staging) / "plan-spill"),
                                     cfg.memory_limit)
            busy = _heads_with_work(levels, preview)
            load_models([h for h in cfg.heads if h.name in busy], cfg.max_resident_models)
        else:
            create_database(cfg.database, cfg.data_path)  # a new file no other process can hold yet
        # every write of the run is staged and applied by the loader when it gets the file
        stage_run_start(cfg.database, run_id, cfg.source, cfg.corpus, identities, cfg.staging)
        loader = _Loader(cfg, s)
        try:
            loader.load(0)  # what earlier runs left (a crash, a held file) loads first
            s.recovered_rows = loader.recovered
            staging = staging_dir(cfg.database, run_id, cfg.staging)
            changed = loader.packages > 0  # other runs' packages changed doc_state since the preview
            window = cfg.max_units_in_flight or 2 * _workers()
            for depth, level in enumerate(levels):
                if depth and not loader.load_all():  # this level plans from results still staged
                    s.deferred = [h.name for later in levels[depth:] for h in later]
                    log.warning(f"heads {', '.join(s.deferred)} deferred to the next run: their upstream results "
                                f"could not be loaded within load_wait ({cfg.load_wait:g} s)")
                    break
                wait_readable(cfg.database, cfg.load_wait)
                known = preview[depth] if depth < len(preview) else None
                if known is not None and not changed and (known[5] is not None or not any(p.n_units for p in known[2].values())):
                    # the database is as the preview read it: its counts (nothing to do) or its open plan
                    files, usable, plans, docs_read, errors, level_plan = known
                else:
                    if known is not None and known[5] is not None:
                        known[5].close()  # packages loaded since the preview changed doc_state: plan again
                    files, usable, level_plan, errors = plan_corpus(
                        cfg.corpus, cfg.database, [plan_heads[h.name] for h in level], cfg.id_column,
                        cfg.text_column, cfg.unit_docs, full, str(staging / "inputs"), cfg.max_attempts,
                        retry_failed, str(staging / "plan-spill"), cfg.memory_limit)
                    plans, docs_read = level_plan.heads, level_plan.rows_scanned
                changed = changed or any(p.n_units for p in plans.values())  # later levels' previews are stale
                if depth == 0:
                    s.files, s.docs_read = len(files), docs_read
                s.file_errors += [e for e in errors if e not in s.file_errors]
                try:
                    _run_level(cfg, level, plans, level_plan, s, str(staging), window, loader)
                finally:
                    if level_plan is not None:
                        level_plan.close()
                _check_heads(level, s)
                gold = [h for h in level if h.gold_column]
                loaded = bool(gold) and (loader.load_all() or not loader.waiting)
                for h in gold:  # metrics read the stored results: computed now if the level's are loaded,
                    if loaded:  # else by the loader once the file frees up
                        s.heads[h.name].metrics = evaluate_gold(cfg.database, usable, h, cfg.id_column,
                                                                s.heads[h.name].model_id, run_id, cfg.staging)
                    else:
                        stage_evaluation(cfg.database, run_id, usable, h, cfg.id_column, s.heads[h.name].model_id,
                                         cfg.staging)
            loader.load_all()  # after the last unit: up to load_wait for what is still staged
            for e in s.file_errors:
                log.error(e)
            s.pending_packages = loader.waiting
            s.status = ("completed_with_errors" if s.file_errors else
                        "completed_pending_load" if s.pending_packages or s.deferred else "completed")
        except BaseException as exc:
            if preview and preview[0] is not None and preview[0][5] is not None:
                preview[0][5].close()  # when the run failed before its first level
            s.status = "failed"
            stage_run_finish(cfg.database, run_id, "failed", s.docs_read, s.head_stats(), s.file_errors,
                             f"{type(exc).__name__}: {exc}", cfg.staging)
            try:
                loader.load(0)
            except Exception as also:  # the run's own error is the one to report; this one is logged
                log.error(f"staged writes not applied: {type(also).__name__}: {also}")
            raise
        s.wall_seconds = time.perf_counter() - started
        stage_run_finish(cfg.database, run_id, s.status, s.docs_read, s.head_stats(), s.file_errors, None,
                         cfg.staging)
        loader.load(0 if s.pending_packages else min(5.0, cfg.load_wait))
        if s.pending_packages:
            log.warning(pending_line(s.pending_packages, cfg.source))
    summary = asdict(s)
    publish_run_artifact(summary)
    return summary


def pending_line(n: int, config: str | None) -> str:
    """The one line a run ends with when load packages still wait for the database."""
    return (f"{n} load package(s) wait for the database (another process holds the file): load them with "
            f"`taskheads load {config or 'CONFIG'}`, or the next run loads them first")


class _Loader:
    """The run's side of the staged loader: loads what waits when the file can be had, counts what it
    loaded into the summary, and keeps one `load_wait` budget for the whole run (a level that waited it
    out does not make the last wait long again)."""

    def __init__(self, cfg, s: RunSummary) -> None:
        self.cfg, self.s = cfg, s
        self.recovered = 0
        self.packages = 0  # packages loaded, this run's and others'
        self.waiting = 0
        self.deadline: float | None = None
        self.units: list = []  # (head, unit) of this run's units whose packages may load now: in flight, just done

    def _unit_named(self, shard: str) -> str:
        """The unit that staged a package, as a failed unit is reported (looked up only for a quarantine)."""
        for head, unit in self.units:
            if shard_id_for(self.s.run_id, head, unit) == shard:
                return f"{unit.source or unit.path}: {head} failed on rows {unit.unit_id}"
        return "load package"

    def load(self, wait_seconds: float) -> bool:
        """Apply what waits, waiting up to `wait_seconds` for the file; True when nothing waits any more."""
        got = load_staged(self.cfg.database, self.s.run_id, self.cfg.staging, wait_seconds)
        if got["packages"]:
            hand_back_freed()
        self.recovered += got["recovered_rows"]
        self.packages += got["packages"]
        for head, rows in got["rows"].items():
            if head in self.s.heads:
                self.s.heads[head].rows += rows
        for entry in got["quarantined"]:  # the unit's error, as if its load had raised
            where = self._unit_named(entry.split(":")[0])
            self.s.file_errors.append(f"{where} (PackageQuarantined: {entry.strip()[:200]})")
        self.waiting = got["waiting"]
        return not got["busy"]

    def load_all(self) -> bool:
        """Load what waits, retrying with backoff until the run's `load_wait` budget runs out."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.cfg.load_wait
        return self.load(max(0.0, self.deadline - time.monotonic()))


def _plan_heads(cfg, s: RunSummary) -> tuple[dict[str, PlanHead], list[dict]]:
    """Each head's model identity from its files (no model loaded), and what planning needs of it.

    Returns the plan heads (their earlier, version-1 ids as aliases: rows stored under them count until
    they are mapped) and the identities to register in `models`."""
    identified = dict(zip([h.name for h in cfg.heads], identify_models(list(cfg.heads))))
    for name, (identity, _) in identified.items():
        s.heads[name].model_id = identity["model_id"]
        s.heads[name].backend = identity.get("backend", "torch")
        s.heads[name].backend_auto = cfg.head(name).backend == "auto"
    plans = {h.name: PlanHead(h.name, cfg.routing(h), identified[h.name][1], identified[h.name][0]["model_id"],
                              upstream=tuple((u, cfg.head(u).result_table) for u in cfg.upstream(h)), input=h.input,
                              aliases=(identified[h.name][0]["legacy_model_id"],))
             for h in cfg.heads}
    return plans, [identity for identity, _ in identified.values()]


def _heads_with_work(levels, preview) -> set[str]:
    """Heads the preview gives units to, every head of a level it could not plan, and every head after
    a level with work (its upstream results change)."""
    busy: set[str] = set()
    for level, known in zip(levels, preview):
        if known is None or busy:
            busy |= {h.name for h in level}
        else:
            busy |= {name for name, plan in known[2].items() if plan.n_units}
    return busy


def _workers() -> int:
    """Processes or threads the flow's task runner runs units on (threads, or Dask's n_workers)."""
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    n = getattr(runner, "_max_workers", None) or (getattr(runner, "cluster_kwargs", None) or {}).get("n_workers")
    return int(n or 1)


def _round_robin(level, level_plan):
    """(head config, unit) of the level's heads in turns, read from the plan only as they are asked for."""
    streams = [(h, iter(level_plan.units(h.name))) for h in level] if level_plan is not None else []
    while streams:
        for entry in list(streams):
            h, units = entry
            unit = next(units, None)
            if unit is None:
                streams.remove(entry)
            else:
                yield h, unit


def _run_level(cfg, level, plans, level_plan, s: RunSummary, staging: str, window: int, loader) -> None:
    """Submit the level's units through a window of `window` units in flight (submitted, not yet
    inferred), loading what is staged as each finishes (in this process, when the file can be had at
    once: while another process holds it, units go on inferring and staging); the next unit is read
    from the plan only when one leaves the window, so memory follows the window, not the corpus."""
    t0 = time.perf_counter()
    log = get_run_logger()
    with ProgressArtifacts() as progress:
        for h in level:
            hs, plan = s.heads[h.name], plans[h.name]
            hs.routed, hs.unchanged, hs.duplicates = plan.routed, plan.unchanged, plan.duplicates
            hs.retried, hs.skipped_failed = plan.retried, plan.skipped_failed
            log.info(f"plan {h.name}: {plan.routed} routed, {plan.unchanged} unchanged, {plan.duplicates} "
                     f"duplicates, {plan.skipped_failed} failed before and skipped; {plan.to_infer} to infer "
                     f"({plan.retried} retried) in {plan.n_units} units"
                     + (f", {plan.conflicts} conflicting ids" if plan.conflicts else ""))
            emit("head_planned", head=h.name, units=plan.n_units, docs=plan.to_infer + plan.conflicts)
            progress.add(h.name, plan.to_infer + plan.conflicts, plan.n_units)
        pending: dict = {}
        numbers = {h.name: 0 for h in level}
        for h, unit in _round_robin(level, level_plan):
            while len(pending) >= window:
                _finish_one(cfg, pending, progress, s, t0, loader)
            numbers[h.name] += 1  # task runs read `infer-<head>-<n>` in the UI
            future = infer_unit.with_options(task_run_name=f"infer-{h.name}-{numbers[h.name]}").submit(
                unit, h, cfg.id_column, cfg.text_column, s.run_id, s.heads[h.name].model_id, staging,
                cfg.max_resident_models, cfg.database if is_lake(cfg.database) else None)
            pending[future] = (h, unit)
        while pending:
            _finish_one(cfg, pending, progress, s, t0, loader)


def _finish_one(cfg, pending: dict, progress: ProgressArtifacts, s: RunSummary, t0: float, loader) -> None:
    """Wait for the first unit in flight to finish, count it and load what is staged if the file is free."""
    future = next(iter(as_completed(list(pending))))
    h, unit = pending.pop(future)
    _forget_task_results()
    hs = s.heads[h.name]
    try:
        out = future.result()
    except Exception as exc:  # a bug, a broken model, a file changed mid-run: loud, and the rest goes on
        get_run_logger().error(f"head {h.name}, unit {unit.unit_id} failed; its documents stay as they were and "
                               "are retried next run", exc_info=exc)
        s.file_errors.append(f"{unit.source or unit.path}: {h.name} failed on rows {unit.unit_id} "
                             f"({type(exc).__name__}: {str(exc).strip()[:200]})")
        emit("unit_done", head=h.name, docs=len(unit.rows) + len(unit.refused), failed=0)
        progress.unit_done(h.name, len(unit.rows) + len(unit.refused), failed=True)
        return
    finally:
        hs.seconds = time.perf_counter() - t0  # the head's share of the level: until its last unit
    hs.inferred += out.inferred
    hs.rows += out.loaded_rows or 0  # committed by the unit's own task (a lake)
    hs.done += out.done
    hs.failed += out.failed
    hs.model_failed += out.model_failed
    for reason, n in out.reasons:
        hs.reasons[reason] = hs.reasons.get(reason, 0) + n
    if out.worker not in hs.workers:
        hs.workers.append(out.worker)
    emit("unit_done", head=h.name, docs=len(unit.rows) + len(unit.refused), failed=out.failed)
    progress.unit_done(h.name, len(unit.rows) + len(unit.refused))
    loader.units = [(h.name, unit), *((x.name, u) for x, u in pending.values())]
    try:
        loader.load(0)
    finally:
        loader.units = []


def _forget_task_results() -> None:
    """Drop what Prefect keeps of finished tasks for dependency tracking. It links each task's result, and
    each part of it, to a copy of the task's final state in the flow run's context, for the whole flow run:
    about 6 links per unit and its load, so over a 10M-document run's 5,000 units the flow's memory grew
    with every one. The flow never passes a task's result to another task, so no link is ever read."""
    links = getattr(FlowRunContext.get(), "run_results", None)
    if not links:
        return
    for key, entry in list(links.items()):  # running units add theirs meanwhile, from their threads
        if entry[1] == RunType.TASK_RUN:
            links.pop(key, None)


def _check_heads(level, s: RunSummary) -> None:
    """A head whose every inferred document failed is broken, not unlucky: report it like a failed unit."""
    for h in level:
        hs = s.heads[h.name]
        hs.reasons = dict(sorted(hs.reasons.items(), key=lambda kv: -kv[1])[:3])
        if hs.inferred and hs.model_failed == hs.inferred:
            reason, n = next(iter(hs.reasons.items()), ("unknown", hs.inferred))
            s.file_errors.append(f"{h.name}: all {hs.inferred} documents failed; most common reason ({n}): {reason}")
