"""`taskheads` command line: run a config ad hoc or on a schedule, query results, write a report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

FORMATS = ("table", "csv", "json", "parquet")  # taskheads sql --format
EX_TEMPFAIL = 75  # sysexits.h: temporary failure, try again later (another process holds the database)


def quiet_prefect_console(verbose: bool = False) -> None:
    """Quiet console defaults; any value the user set wins.

    Prefect's console handler would print every failed task with its traceback; the summary says
    what failed in one line per problem instead. Logs still reach the Prefect API (and UI).
    """
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def format_summary(s: dict) -> str:
    lines = [f"run {s['run_id']}  status {s['status']}  ->  {s['database']}",
             f"docs read: {s['docs_read']} from {s['files']} file(s)   wall time: {s['wall_seconds']:.1f} s"]
    if s.get("recovered_rows"):
        lines.append(f"recovered {s['recovered_rows']} result rows staged by an interrupted run")
    lines.append("")
    cols = ("routed", "unchanged", "retried", "inferred", "done", "failed", "rows")
    lines.append(f"{'head':<16}{'task':<15}" + "".join(f"{c:>10}" for c in cols) + f"{'seconds':>9}")
    for name, h in s["heads"].items():
        lines.append(f"{name:<16}{h['task']:<15}" + "".join(f"{h.get(c, 0):>10}" for c in cols)
                     + f"{h['seconds']:>9.1f}")
    for name, h in s["heads"].items():
        if h.get("backend_auto") or h.get("backend", "torch") != "torch":
            why = f" (backend = \"auto\": the fastest installed for {h['task']})" if h.get("backend_auto") else ""
            lines.append(f"{name}: backend {h.get('backend', 'torch')}{why}")
    for name, h in s["heads"].items():
        if h.get("metrics"):
            shown = ", ".join(f"{k} {v:.3f}" if k != "n" else f"n {v}" for k, v in h["metrics"].items())
            lines.append(f"{name}: against gold: {shown}")
    for name, h in s["heads"].items():
        if h.get("skipped_failed"):
            lines.append(f"{name}: {h['skipped_failed']} document(s) that failed before were not retried "
                         "(terminal fault, or max_attempts reached): taskheads run --retry-failed tries them again")
    if any(h["failed"] for h in s["heads"].values()):
        lines.append("")
        lines.append("failed documents: taskheads sql DB \"SELECT head, doc_id, kind, attempts, error FROM failed_docs "
                     f"WHERE run_id = '{s['run_id']}'\"")
    if s.get("deferred"):
        lines.append(f"heads {', '.join(s['deferred'])} deferred to the next run: the results they plan from could "
                     "not be loaded while another process held the database")
    if s.get("pending_packages"):
        from flows.process_corpus import pending_line

        lines.append(pending_line(s["pending_packages"], s.get("config")))
    for e in s["file_errors"]:
        lines.append(f"error: {e}")
    for q in s.get("quarantined", []):  # those of this run's units are among the errors already
        if not any(q[:80] in e for e in s["file_errors"]):
            lines.append(f"quarantined (cannot be loaded, moved to the staging folder's quarantine/): {q}")
    return "\n".join(lines)


def _checked(args: argparse.Namespace):
    """(config with CLI overrides, corpus files), checked against the corpus (all that `check`
    checks), with Prefect's console quieted; None (after one error line) when it cannot run.
    Hub models without `revision` get a one-line warning each."""
    from core.errors import ConfigError, SchemaTooNew
    from pipeline.config import load_config
    from pipeline.preflight import preflight, unpinned_models
    from storage.db import check_database

    try:
        cfg = load_config(args.config).with_overrides(corpus=args.corpus, database=args.db)
        files = preflight(cfg)
        check_database(cfg.database)
    except ConfigError as exc:
        print(f"taskheads: config error: {exc}", file=sys.stderr)
        return None
    except SchemaTooNew as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return None
    for line in unpinned_models(cfg):
        print(f"taskheads: warning: {line}", file=sys.stderr)
    quiet_prefect_console(args.verbose)
    return cfg, files


def _checked_config(args: argparse.Namespace):
    checked = _checked(args)
    return checked[0] if checked else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def cmd_check(args: argparse.Namespace) -> int:
    """Everything a run checks before its first write, and nothing else: no model loaded, no row read
    but the corpus files' schemas, nothing written. For CI: exit 0 or 2."""
    checked = _checked(args)
    if checked is None:
        return 2
    cfg, files = checked
    print(f"taskheads: {args.config} ok: {_plural(len(cfg.heads), 'head')} ({', '.join(h.name for h in cfg.heads)}) "
          f"in {_plural(len(cfg.levels()), 'level')}, {_plural(len(files), 'corpus file')} -> {cfg.database}")
    return 0


def task_runner(runner: str, address: str | None, workers: int):
    """The Prefect task runner for `--runner`: threads in this process, or Dask (local cluster or `address`)."""
    if runner == "thread":
        return None
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # one torch thread per worker process: the workers share this machine's cores
    threads = os.environ.get("TASKHEADS_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": ":0",
                                          "env": {"TASKHEADS_THREADS": threads, "RAYON_NUM_THREADS": threads}})


class ProgressBars:
    """One rich progress bar per head (documents to infer), fed by the flow's progress events."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bars: dict[str, int] = {}

    def __call__(self, event: str, info: dict) -> None:
        if event == "head_planned" and info["docs"]:
            self.bars[info["head"]] = self.progress.add_task(info["head"], total=info["docs"])
        elif event == "unit_done" and info["head"] in self.bars:
            self.progress.advance(self.bars[info["head"]], info["docs"])

    def __enter__(self):
        from core.progress import subscribe

        self.unsubscribe = subscribe(self)
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
        self.unsubscribe()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def cmd_run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack, nullcontext, redirect_stdout

    cfg = _checked_config(args)
    if cfg is None:
        return 2
    if args.plan_only:
        return _plan_only(cfg, args)
    if args.runner == "dask":
        try:
            __import__("prefect_dask")  # an optional part of taskheads
        except ImportError:
            print("taskheads: --runner dask needs the [dask] extra (prefect-dask): pip install 'taskheads[dask]'",
                  file=sys.stderr)
            return 2
    stdout = sys.stdout
    with ExitStack() as stack:
        if args.json:  # stdout carries the JSON document only: anything printed during the run goes to stderr
            stack.enter_context(redirect_stdout(sys.stderr))
        try:
            if args.runner != "thread":  # Dask workers need one shared API, not one ephemeral API each
                from .server import prefect_api

                stack.enter_context(prefect_api())
            from flows.process_corpus import process_corpus

            runner = task_runner(args.runner, args.address, args.workers)
            flow = process_corpus.with_options(task_runner=runner) if runner else process_corpus
            show = sys.stderr.isatty() and not args.verbose and not args.no_progress
            with ProgressBars() if show else nullcontext():
                summary = flow(config_path=args.config, corpus=cfg.corpus, database=cfg.database, full=args.full,
                               retry_failed=args.retry_failed)
        except Exception as exc:
            from core.errors import DatabaseLocked, ModelLoadError

            if isinstance(exc, DatabaseLocked):  # temporary: nothing lost, a later run (or retry) does it all
                print(f"taskheads: {_first_line(exc)}", file=sys.stderr)
                return EX_TEMPFAIL
            if isinstance(exc, ModelLoadError):  # a model that cannot run is a config problem, refused before work
                print(f"taskheads: config error: {_first_line(exc)}", file=sys.stderr)
                return 2
            print(f"taskheads: run failed: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
            return 1
    status = 1 if summary["file_errors"] or summary["status"] not in ("completed", "completed_pending_load") else 0
    if args.json:
        import json

        stdout.write(json.dumps(summary) + "\n")  # the RunSummary's fields, as the flow returns them
        stdout.flush()
        return status
    from storage.db import quarantined

    try:
        summary["quarantined"] = quarantined(cfg.database, summary["run_id"])
    except Exception as exc:  # the run is recorded; this is only the summary
        summary["quarantined"] = [f"(not read: {type(exc).__name__}: {exc})"]
    print(format_summary(summary))
    return status


def cmd_load(args: argparse.Namespace) -> int:
    """Load the packages (and the other writes) runs staged while another process held the database."""
    from core.errors import ConfigError, DatabaseBusy, SchemaTooNew
    from heads.registry import result_tables
    from pipeline.config import load_config
    from storage import db

    try:
        cfg = load_config(args.config).with_overrides(database=args.db)
    except (ConfigError, OSError) as exc:
        print(f"taskheads: config error: {_first_line(exc)}", file=sys.stderr)
        return 2
    wait = cfg.load_wait if args.wait is None else args.wait
    try:
        with db.run_lock(cfg.database, f"load-{os.getpid()}", cfg.staging):
            got = db.load_staged(cfg.database, tables=result_tables(), staging=cfg.staging, wait_seconds=wait,
                                 log=lambda line: print(f"taskheads: {line}", file=sys.stderr))
    except DatabaseBusy as exc:  # a run is writing (it loads them itself)
        print(f"taskheads: {_first_line(exc)}", file=sys.stderr)
        return EX_TEMPFAIL
    except SchemaTooNew as exc:
        print(f"taskheads: {_first_line(exc)}", file=sys.stderr)
        return 1
    if got.busy:
        print(f"taskheads: {got.waiting} load package(s) still wait: {_first_line(Exception(got.busy))}",
              file=sys.stderr)
        return EX_TEMPFAIL
    print(f"loaded {got.packages} package(s): {got.recovered_rows + sum(got.rows.values())} result rows, "
          f"{got.ops} other write(s) -> {cfg.database}")
    return 0


def _plan_only(cfg, args: argparse.Namespace) -> int:
    """`run --plan-only`: no Prefect flow, no model loaded, the database only read."""
    from core.errors import DatabaseBusy, ModelLoadError
    from pipeline.preview import format_preview, preview

    try:
        print(format_preview(preview(cfg, full=args.full, retry_failed=args.retry_failed)))
    except (ModelLoadError, ValueError) as exc:
        print(f"taskheads: config error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except DatabaseBusy as exc:
        print(f"taskheads: {_first_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. a database older than this code: a run migrates it first
        print(f"taskheads: plan failed: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the corpus flow on a schedule: each run picks up only new or changed documents."""
    import warnings
    from pathlib import Path

    from .server import ServerError, auth_file, prefect_api

    cfg = _checked_config(args)
    if cfg is None:
        return 2
    # Prefect's SIGTERM handler leaves its runner's stop coroutine unawaited; the warning is noise
    warnings.filterwarnings("ignore", message=r"coroutine 'Runner\.astop' was never awaited")
    name = args.name or f"taskheads-{Path(args.config).stem}"
    try:
        with prefect_api(wait_for_runs=args.stop_timeout) as url:
            from flows.process_corpus import process_corpus

            try:
                missed = drop_missed_runs(f"process-corpus/{name}")
            except Exception as exc:  # housekeeping only: serve anyway
                missed = 0
                print(f"taskheads: could not drop missed scheduled runs: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
            if missed:
                print(f"taskheads: dropped {missed} scheduled run(s) missed while nothing served "
                      f"process-corpus/{name}; the next run picks up every new or changed document", flush=True)
            when = f"cron {args.cron!r}" if args.cron else f"every {args.interval} s"
            print(f"taskheads: serving deployment process-corpus/{name} ({when}) via {url}; Ctrl-C stops",
                  flush=True)
            if auth_file(url).exists():  # the server started here: its UI asks for the login string
                print(f"taskheads: Prefect UI at {url.removesuffix('/api')} (login string in {auth_file(url)}, "
                      "readable by you only)", flush=True)
            process_corpus.serve(
                name=name, cron=args.cron, interval=args.interval, limit=1, print_starting_message=False,
                parameters={"config_path": str(Path(args.config).resolve()), "corpus": cfg.corpus,
                            "database": cfg.database, "full": False},
                tags=["taskheads"], description=f"taskheads corpus flow for {Path(args.config).name}")
    except ServerError as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def drop_missed_runs(deployment: str, grace_seconds: float = 60.0) -> int:
    """Delete the deployment's scheduled runs whose time passed while nothing served it.

    Like cron, a restarted `serve` does not catch up: the next scheduled run picks up every new or
    changed document anyway, so replaying each missed slot one after another would only cost time.
    """
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return 0
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace_seconds)
        missed = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                               state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                               expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff))
        dropped = 0
        while page := client.read_flow_runs(flow_run_filter=missed, limit=200):  # the API's page limit
            for run in page:
                client.delete_flow_run(run.id)
            dropped += len(page)
        return dropped


def cmd_report(args: argparse.Namespace) -> int:
    from .report import main_report

    return main_report(args.db, args.out)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60, more: bool = False) -> str:
    def cell(v) -> str:
        s = "NULL" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
        s = s.replace("\n", " ")
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    if more:
        out.append(f"({len(rows)} rows shown, more not shown: --limit 0 shows all, --format csv|json|parquet "
                   "writes all)")
    else:
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from storage.db import DatabaseBusy, SchemaTooNew
    from storage.sandbox import UnsafeSQL

    from storage.db import exists
    from storage.lake import LakeError, is_lake

    try:
        found = exists(args.db)
    except LakeError as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"taskheads: database not found: {args.db}", file=sys.stderr)
        return 2
    if args.at_run is not None and not is_lake(args.db):
        print("taskheads: --at-run needs a DuckLake database (ducklake:...): a DuckDB file keeps no history",
              file=sys.stderr)
        return 2
    for path in args.read:
        if not os.path.exists(path):
            print(f"taskheads: --read {path}: no such file or folder", file=sys.stderr)
            return 2
    if args.format == "parquet" and not args.out:
        print("taskheads: --format parquet writes a file: give it with --out FILE", file=sys.stderr)
        return 2
    if args.limit < 0:
        print(f"taskheads: --limit: expected a number of rows >= 0 (0: all), got {args.limit}", file=sys.stderr)
        return 2
    if args.out and not Path(args.out).resolve().parent.is_dir():
        print(f"taskheads: --out {args.out}: no such folder {Path(args.out).resolve().parent}", file=sys.stderr)
        return 2
    try:
        text = _sql_output(args)
    except (SchemaTooNew, LookupError, LakeError) as exc:  # LookupError: --at-run names no finished run
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    except UnsafeSQL as exc:
        print(f"taskheads: refused: {exc}", file=sys.stderr)
        return 2
    except duckdb.PermissionException as exc:
        print(f"taskheads: refused: {str(exc).strip().splitlines()[0]} (taskheads sql opens only the database and "
              "the files or folders given with --read)", file=sys.stderr)
        return 2
    except DatabaseBusy as exc:
        print(f"taskheads: {exc}; try again when the run's load finishes", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"--out {args.out}" if args.out else "query failed"
        print(f"taskheads: {where}: {exc.strerror or _first_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"taskheads: query failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    if text is not None:
        sys.stdout.write(text)
    return 0


def _sql_output(args: argparse.Namespace) -> str | None:
    """Run the query; the text for stdout, or None when it went to `--out` (written by this process,
    through a temporary file renamed into place: the SQL itself can write nothing)."""
    import tempfile

    from storage import reader

    common = {"wait_seconds": args.wait, "read": args.read, "at_run": args.at_run}
    if args.format in ("table", "json"):
        limit = (args.limit or None) if args.format == "table" else None
        columns, rows, more = reader.select_rows(args.db, args.query, limit=limit, **common)
        text = (format_table(columns, rows, more=more) + "\n" if args.format == "table"
                else reader.json_text(columns, rows))
        if not args.out:
            return text
        reader.write_file(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return None
    table = reader.select_arrow(args.db, args.query, **common)
    write = reader.write_csv if args.format == "csv" else reader.write_parquet
    if args.out:
        reader.write_file(args.out, lambda tmp: write(table, tmp))
        return None
    with tempfile.TemporaryDirectory(prefix="taskheads-sql-") as folder:
        write(table, os.path.join(folder, "out.csv"))
        reader.copy_to(os.path.join(folder, "out.csv"), sys.stdout)
    return None


def cmd_train(args: argparse.Namespace) -> int:
    """The training flow from the command line: base model + labelled Parquet rows -> a head folder."""
    import json

    from core.errors import ConfigError

    for flag, path in (("--train", args.train), ("--eval", args.eval)):
        if not Path(path).is_file():
            print(f"taskheads: {flag} {path}: no such file (training rows, Parquet)", file=sys.stderr)
            return 2
    try:
        params = _head_params(args.param)
    except ConfigError as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    quiet_prefect_console(args.verbose)
    from tasks.training import EVAL_METRICS

    if args.task not in EVAL_METRICS:
        print(f"taskheads: cannot train task {args.task!r}; trainable: {', '.join(sorted(EVAL_METRICS))}",
              file=sys.stderr)
        return 2
    from flows.train_head import train_head

    progress = sys.stderr.isatty() and not args.no_progress
    try:
        metrics = train_head(task=args.task, base_model=args.base_model, out_dir=args.out_dir, train_path=args.train,
                             eval_path=args.eval, database=args.db, head=args.head, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                             progress=progress, head_params=params)
    except Exception as exc:
        print(f"taskheads: training failed: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(metrics))
        return 0
    shown = ", ".join(f"{m} {metrics[m]:.3f}" for m in EVAL_METRICS[args.task])
    line = f"trained {args.task} head {args.head!r} -> {args.out_dir}: {shown} (held out: {metrics['n']} rows)"
    if args.db:
        line += f"; metrics in {args.db} (evaluations, model_id {metrics['model_id']})"
    print(line)
    return 0


def _head_params(items: list[str]) -> dict | None:
    """`--param KEY=VALUE` (VALUE a TOML value, or else a plain string) -> the head's params."""
    from core.errors import ConfigError

    if not items:
        return None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    params = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. questions=[\"Who?\"]")
        try:
            params[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = value.strip()
    return params


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of a pipeline config, from the heads' typed declarations (for editors completing TOML)."""
    import json

    from pipeline.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from heads.registry import result_tables
    from storage.lake import LakeError, is_lake
    from storage.migrate_lake import LakeNotEmpty, copy_to_lake

    if not os.path.isfile(args.db):
        print(f"taskheads: database not found: {args.db}", file=sys.stderr)
        return 2
    if not is_lake(args.lake):
        print(f"taskheads: {args.lake}: not a lake (ducklake:sqlite:FILE or ducklake:postgres:CONNECTION)",
              file=sys.stderr)
        return 2
    try:
        counts = copy_to_lake(args.db, args.lake, tables=result_tables(), data_path=args.data_path)
    except (LakeError, LakeNotEmpty) as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    for table, n in counts.items():
        print(f"{table}: {n} rows")
    print(f"copied {args.db} into {args.lake}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from storage.lake import LakeError, compact, is_lake

    if not is_lake(args.db):
        print(f"taskheads: {args.db}: compact is for a DuckLake (ducklake:...)", file=sys.stderr)
        return 2
    try:
        done = compact(args.db, args.keep_days)
    except LakeError as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    print(f"merged {done['merged']} file group(s), expired {done['expired']} snapshot(s), "
          f"deleted {done['cleaned']} file(s)")
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config (TOML)")
    p.add_argument("--corpus", help="override the config's corpus (file, folder or glob)")
    p.add_argument("--db", help="override the config's database file")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs on the console")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskheads", description="Run transformer task heads over Parquet "
                                     "corpora and query the results in DuckDB.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"taskheads {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline config once (ad hoc)")
    _config_args(run)
    run.add_argument("--json", action="store_true", help="print the run summary as one JSON document on stdout "
                     "(the fields of taskheads.RunSummary); everything else goes to stderr")
    run.add_argument("--full", action="store_true", help="infer every document, even those unchanged since the "
                     "last run")
    run.add_argument("--retry-failed", action="store_true", help="try again every document that failed before, "
                     "terminal faults and those out of attempts included")
    run.add_argument("--plan-only", action="store_true", help="print per head the documents routed, unchanged "
                     "and to infer (with a time estimate from its last run), load no model, write nothing")
    run.add_argument("--runner", choices=("thread", "dask"), default="thread",
                     help="where units run: threads in this process (default) or Dask workers")
    run.add_argument("--address", help="with --runner dask: scheduler address of an existing Dask cluster "
                     "(default: start a local cluster)")
    run.add_argument("--workers", type=int, default=2, help="with --runner dask: local cluster worker processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)
    load = sub.add_parser("load", help="load what runs staged while another process held the database (the "
                          "next run does it first too); exit 75 while the file stays held")
    load.add_argument("config", help="pipeline config (TOML)")
    load.add_argument("--db", help="override the config's database file")
    load.add_argument("--wait", type=float, help="seconds to wait for the file (default: the config's load_wait)")
    load.set_defaults(func=cmd_load)
    check = sub.add_parser("check", help="check a config as a run would before its first write (keys, model "
                           "folders, corpus, columns, where, database version), doing no work; exit 0 or 2")
    _config_args(check)
    check.set_defaults(func=cmd_check)
    serve = sub.add_parser("serve", help="serve the config as a scheduled Prefect deployment (runs until stopped)")
    _config_args(serve)
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 * * * *" (hourly)')
    when.add_argument("--interval", type=float, help="seconds between runs")
    serve.add_argument("--name", help="deployment name (default: taskheads-<config file stem>)")
    serve.add_argument("--stop-timeout", type=float, default=900.0, help="on SIGTERM/Ctrl-C, seconds to let a "
                       "running flow run finish before the Prefect server this command started is stopped")
    serve.set_defaults(func=cmd_serve)
    report = sub.add_parser("report", help="write an HTML report with plots of a results database")
    report.add_argument("db")
    report.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    report.set_defaults(func=cmd_report)
    sql = sub.add_parser("sql", help="run one read-only SELECT against a results database (sandboxed)")
    sql.add_argument("db")
    sql.add_argument("query")
    sql.add_argument("--wait", type=float, default=30.0, help="seconds to wait while a writer holds the file")
    sql.add_argument("--read", action="append", default=[], metavar="PATH",
                     help="a file or folder the query may read (e.g. the corpus, for joins); repeatable. "
                     "Nothing else can be opened, and nothing written, attached, installed or set")
    sql.add_argument("--format", choices=FORMATS, default="table", help="table (default, at most --limit rows), "
                     "csv (header, DuckDB's text for nested values), json (an array of objects) or parquet "
                     "(needs --out)")
    sql.add_argument("--out", metavar="FILE", help="write the result to FILE instead of stdout (written by taskheads "
                     "itself, complete or not at all; the SQL can write nothing)")
    sql.add_argument("--limit", type=int, default=50, help="--format table: rows shown (default 50; 0: all)")
    sql.add_argument("--at-run", metavar="RUN_ID", help="a DuckLake database as it was when that run finished "
                     "(time travel; the run ids are in the runs table)")
    sql.set_defaults(func=cmd_sql)
    migrate = sub.add_parser("migrate", help="copy a DuckDB results file into a DuckLake (every table and view; "
                             "the file is only read)")
    migrate.add_argument("db", help="the .duckdb results file")
    migrate.add_argument("lake", help="ducklake:sqlite:FILE or ducklake:postgres:CONNECTION (new, or empty)")
    migrate.add_argument("--data-path", help="the lake's Parquet folder (default beside a SQLite catalog; "
                         "required with PostgreSQL)")
    migrate.set_defaults(func=cmd_migrate)
    compact = sub.add_parser("compact", help="DuckLake maintenance: merge small files, expire old snapshots, "
                             "delete files no snapshot needs (time travel before it ends)")
    compact.add_argument("db", help="ducklake:sqlite:FILE or ducklake:postgres:CONNECTION")
    compact.add_argument("--keep-days", type=float, default=7.0, help="keep the snapshots of the last DAYS for "
                         "time travel (default 7; 0: expire every snapshot but the current one)")
    compact.set_defaults(func=cmd_compact)
    train = sub.add_parser("train", help="fine-tune a base encoder into a head (the train-head flow): "
                           "classification, ner or qa")
    train.add_argument("task", help="classification | ner | qa")
    train.add_argument("base_model", help="base encoder: a local model folder (or a hub id)")
    train.add_argument("out_dir", help="folder the trained head is saved in (safetensors, tokenizer, labels)")
    train.add_argument("--train", required=True, metavar="PARQUET", help="training rows")
    train.add_argument("--eval", required=True, metavar="PARQUET", help="held-out rows: metrics are computed on them")
    train.add_argument("--db", help="store the held-out metrics in this database (evaluations, source 'training')")
    train.add_argument("--head", default="trained", help="head name the metrics are stored under (default trained)")
    train.add_argument("--epochs", type=float, default=2)
    train.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-length", type=int, help="tokens per training example (default: the model's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a param of the corpus "
                       "head that will run the folder (VALUE in TOML, e.g. questions='[\"Who?\"]'): part of "
                       "the model id the metrics are stored under; repeatable")
    train.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs on the console")
    train.set_defaults(func=cmd_train)
    schema = sub.add_parser("schema", help="print the JSON Schema of a pipeline config (keys, types, defaults, "
                            "docs; heads by task), e.g. for an editor completing pipeline.toml")
    schema.add_argument("--out", help="write it to this file instead of stdout")
    schema.set_defaults(func=cmd_schema)
    from .vectors import add_commands  # search, near-duplicates

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
