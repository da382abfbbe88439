"""`taskheads` command line: run a config ad hoc, query results."""
from __future__ import annotations

import argparse
import os
import sys


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
    cols = ("routed", "unchanged", "inferred", "done", "failed", "rows")
    lines.append(f"{'head':<16}{'task':<15}" + "".join(f"{c:>10}" for c in cols) + f"{'seconds':>9}")
    for name, h in s["heads"].items():
        lines.append(f"{name:<16}{h['task']:<15}" + "".join(f"{h[c]:>10}" for c in cols) + f"{h['seconds']:>9.1f}")
    for name, h in s["heads"].items():
        if h.get("metrics"):
            shown = ", ".join(f"{k} {v:.3f}" if k != "n" else f"n {v}" for k, v in h["metrics"].items())
            lines.append(f"{name}: against gold: {shown}")
    if any(h["failed"] for h in s["heads"].values()):
        lines.append("")
        lines.append("failed documents: taskheads sql DB \"SELECT head, doc_id, error FROM failed_docs "
                     f"WHERE run_id = '{s['run_id']}'\"")
    for e in s["file_errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .preflight import preflight

    try:
        cfg = load_config(args.config).with_overrides(corpus=args.corpus, database=args.db)
        preflight(cfg)
    except ConfigError as exc:
        print(f"taskheads: config error: {exc}", file=sys.stderr)
        return 2
    quiet_prefect_console(args.verbose)
    from flows.process_corpus import process_corpus

    try:
        summary = process_corpus(config_path=args.config, corpus=cfg.corpus, database=cfg.database,
                                 full=args.full)
    except Exception as exc:
        print(f"taskheads: run failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 1 if summary["file_errors"] else 0


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    def cell(v) -> str:
        s = "NULL" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
        s = s.replace("\n", " ")
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.db import DatabaseBusy, query

    if not os.path.exists(args.db):
        print(f"taskheads: database not found: {args.db}", file=sys.stderr)
        return 2
    try:
        columns, rows = query(args.db, args.query, wait_seconds=args.wait)
    except DatabaseBusy as exc:
        print(f"taskheads: {exc}; try again when the run's load finishes", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"taskheads: query failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_table(columns, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskheads", description="Run transformer task heads over Parquet "
                                     "corpora and query the results in DuckDB.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline config once (ad hoc)")
    run.add_argument("config", help="pipeline config (TOML)")
    run.add_argument("--corpus", help="override the config's corpus (file, folder or glob)")
    run.add_argument("--db", help="override the config's database file")
    run.add_argument("--full", action="store_true", help="infer every document, even those unchanged since the "
                     "last run")
    run.add_argument("-v", "--verbose", action="store_true", help="show Prefect's task logs on the console")
    run.set_defaults(func=cmd_run)
    sql = sub.add_parser("sql", help="run one read-only SQL query against a results database")
    sql.add_argument("db")
    sql.add_argument("query")
    sql.add_argument("--wait", type=float, default=30.0, help="seconds to wait while a writer holds the file")
    sql.set_defaults(func=cmd_sql)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
