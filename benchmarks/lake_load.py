"""Loader throughput: a `.duckdb` file vs a DuckLake on SQLite vs a DuckLake on PostgreSQL (issue 15).

Staged packages of the language table (2,000 documents each by default: one row per document) are
loaded (1) by one process, as the flow's loader does (`load_staged`: batches of 16 packages into a file,
one claimed transaction per package into a lake), and (2) on a lake, by W processes at once, each
committing its own packages as Dask workers do (`load_shard`). Every load replaces the documents'
`doc_state` rows, so lake commits conflict and are retried: the figures show what that costs.

    PYTHONPATH=. .venv/bin/python benchmarks/lake_load.py --packages 16 --docs 2000 --writers 2

PostgreSQL: a private server started here (Debian's package; as root it runs as `nobody`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = r"""
import json, sys, time
from heads.registry import result_tables
from storage import db
database, start, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
tables = result_tables()
time.sleep(max(0.0, start - time.time()))  # imports done: every writer starts loading at the same moment
rows = 0
for p in paths:
    rows += db.load_shard(database, p, tables=tables)[0]
print(json.dumps({"rows": rows, "end": time.time()}))
"""


def start_postgres(folder: str) -> tuple[str, list[str], str]:
    bindir = os.path.dirname(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1])
    run_as: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("nobody")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(folder, "data")
    subprocess.run([*run_as, f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-l", f"{folder}/log", "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    return bindir, run_as, str(port)


def packages(folder: Path, n: int, docs: int, run: str, offset: int = 0) -> list[str]:
    from heads.registry import result_tables
    from storage.staging import stage_shard

    table = next(t for t in result_tables() if t.name == "languages")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        ids = [f"d{offset + k * docs + i}" for i in range(docs)]
        rows = [{"head": "lang", "doc_id": d, "language": "de", "confidence": 0.8, "n_chars": 90} for d in ids]
        covered = [{"doc_id": d, "fingerprint": "g", "status": "done"} for d in ids]
        out.append(stage_shard(folder, f"{run}-{k}", "lang", table, "m-lang", rows, [], covered, run))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", type=int, default=16)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/taskheads-lake-bench")
    args = ap.parse_args()
    from heads.registry import result_tables
    from storage import db
    from storage.staging import staging_dir

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pg = tempfile.mkdtemp(prefix="taskheads-pg-bench-")
    bindir, run_as, port = start_postgres(pg)
    results = []
    try:
        for backend in ("duckdb", "lake+sqlite", "lake+postgres"):
            for mode in ("one loader", f"{args.writers} processes"):
                if backend == "duckdb" and mode != "one loader":
                    continue  # one writing process per file: the flow's loader
                name = f"{backend.replace('+', '-')}-{mode.split()[0]}"
                staging = None
                if backend == "duckdb":
                    database = str(work / f"{name}.duckdb")
                elif backend == "lake+sqlite":
                    database = f"ducklake:sqlite:{work / name}.sqlite"
                else:
                    dbname = name.replace("-", "_")
                    subprocess.run([*run_as, f"{bindir}/createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                                    dbname], check=True)
                    database = f"ducklake:postgres:dbname={dbname} host=127.0.0.1 port={port} user=postgres"
                    staging = str(work / f"{name}-staging")
                db.ensure_schema(database, tables=result_tables(),
                                 data_path=str(work / f"{name}-data") if backend == "lake+postgres" else None)
                n_docs = args.packages * args.docs
                if mode == "one loader":
                    packages(staging_dir(database, "bench", staging), args.packages, args.docs, "bench")
                    t0 = time.perf_counter()
                    got = db.load_staged(database, tables=result_tables(), staging=staging, batch=16)
                    seconds = time.perf_counter() - t0
                    assert got.packages == args.packages, got
                else:
                    per = args.packages // args.writers
                    groups = [packages(staging_dir(database, f"w{w}", staging), per, args.docs, f"w{w}",
                                       offset=w * per * args.docs) for w in range(args.writers)]
                    env = {**os.environ, "PYTHONPATH": str(ROOT)}
                    start = time.time() + 15  # after the writers' imports (heads.registry: torch)
                    procs = [subprocess.Popen([sys.executable, "-c", WORKER, database, str(start), *g], env=env,
                                              stdout=subprocess.PIPE, text=True) for g in groups]
                    outs = [json.loads(p.communicate()[0]) for p in procs]
                    seconds = max(o["end"] for o in outs) - start
                    assert sum(o["rows"] for o in outs) == per * args.writers * args.docs, outs
                    n_docs = per * args.writers * args.docs
                (rows,), = db.query(database, "SELECT count(*) FROM languages")[1]
                assert rows == n_docs, (rows, n_docs)
                results.append({"backend": backend, "mode": mode, "packages": args.packages, "docs": n_docs,
                                "seconds": round(seconds, 2), "docs_per_s": round(n_docs / seconds),
                                "ms_per_package": round(1000 * seconds / args.packages)})
                print(json.dumps(results[-1]), flush=True)
    finally:
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", f"{pg}/data", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(pg, ignore_errors=True)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
