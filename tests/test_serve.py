"""`taskheads serve` end to end, the way users run it: a real schedule, a real Prefect server.

Why this exists: serving is the one path the in-process tests cannot cover. It needs a real
`prefect server start` (the ephemeral API refuses to schedule), the served runs execute in other
processes, and the promise "each scheduled run processes only new or changed documents" only holds
if the incremental state in DuckDB survives from one scheduled run to the next. The command is
started as users start it (no PREFECT_API_URL, its own PREFECT_HOME), a Parquet file is added while
it serves, and SIGTERM during a run must stop it cleanly (the run completes, exit code 0, its
Prefect server gone too).
Takes about 40 s: server start ~10 s, the runner picks up a scheduled run every ~10 s.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

SERVE_READY_TIMEOUT = 180  # CLI import + a fresh `prefect server start` (migrations)
RUN_TIMEOUT = 60  # per awaited scheduled run (interval 5 s, runner polls every 10 s)
STOP_TIMEOUT = 60  # lets the run in progress finish (a few seconds here), then stops its server


def write_docs(path: Path, ids: range) -> int:
    pq.write_table(pa.Table.from_pylist([{"id": i, "text": f"document {i}: shares rose after the match"}
                                         for i in ids]), path)
    return len(ids)


def completed_runs(db: Path) -> list[dict]:
    """Completed rows of `runs`, read-only; [] while the file is missing or the writer holds it."""
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return []
    try:
        cur = con.execute("SELECT * FROM runs WHERE status = 'completed' ORDER BY started_at")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    except duckdb.Error:  # schema not created yet
        return []
    finally:
        con.close()


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"serve exited ({proc.returncode}) waiting for {what}:\n{log.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")


def flow_run_processes(pid: int) -> list[psutil.Process]:
    """The live processes the runner started for flow runs (multiprocessing spawn children)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def api(url: str, path: str, body: dict | None = None, auth: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_serve_runs_on_schedule_infers_only_new_documents_and_stops_on_sigterm(tmp_path, tiny_models):
    corpus, db = tmp_path / "corpus", tmp_path / "results.duckdb"
    corpus.mkdir()
    old = write_docs(corpus / "a.parquet", range(6))
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'corpus = "corpus"\ndatabase = "results.duckdb"\n\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # start its own server
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    t0 = time.monotonic()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "taskheads"), "serve", str(cfg), "--interval", "5",
                                 "--name", "serve-test"], cwd=tmp_path, env=env, stdout=o, stderr=e,
                                start_new_session=True)
    family: set[psutil.Process] = set()  # the command and its children, its Prefect server included
    try:
        url = wait_for("serving message", lambda: re.search(r"serving deployment process-corpus/serve-test "
                                                            r"\(every 5.0 s\) via (\S+);", out.read_text()),
                       SERVE_READY_TIMEOUT, proc, err).group(1)
        ready = time.monotonic() - t0
        family |= {proc_ps := psutil.Process(proc.pid), *proc_ps.children(recursive=True)}
        assert "127.0.0.1" in url  # its own server, not one from the environment
        # which answers only its own clients; the UI login string is in a file only we can read
        login = Path(re.search(r"login string in (\S+), readable by you only", out.read_text()).group(1))
        assert login.parent == tmp_path / "prefect-home" and (login.stat().st_mode & 0o077) == 0
        auth = login.read_text()
        try:
            api(url, "/flows/filter", {})
            raise AssertionError("the server answered a request without its auth string")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401

        first = wait_for("first completed run", lambda: completed_runs(db), RUN_TIMEOUT, proc, err)[0]
        first_run = time.monotonic() - t0
        assert (first["docs_inferred"], first["docs_skipped"]) == (old, 0)

        staged = tmp_path / "b.parquet.part"  # written aside, then renamed: no run reads half a file
        new = write_docs(staged, range(100, 104))
        os.replace(staged, corpus / "b.parquet")
        added_at = time.monotonic()
        runs = wait_for("run inferring the new file", lambda: (r := completed_runs(db)) and any(
            x["docs_inferred"] == new for x in r[1:]) and r, RUN_TIMEOUT, proc, err)
        picked_up = time.monotonic() - added_at
        later = runs[1:]
        assert [(r["docs_inferred"], r["docs_skipped"]) for r in later if r["docs_inferred"]] == [(new, old)]
        assert all(r["docs_skipped"] in (old, old + new) for r in later)  # the rest: nothing new, nothing done
        assert sum(r["docs_inferred"] for r in runs) == old + new  # every document inferred exactly once

        # the same runs, as flow runs of the served deployment in the Prefect API
        deployment = api(url, "/deployments/name/process-corpus/serve-test", auth=auth)
        query = {"flow_runs": {"id": {"any_": [r["run_id"] for r in runs]}}, "limit": 50}
        # the `runs` row completes a moment before the flow run returns and Prefect records it
        flow_runs = wait_for("flow runs completed in the API", lambda: (f := api(url, "/flow_runs/filter", query,
                             auth=auth)) and all(x["state_type"] == "COMPLETED" for x in f) and f, 30, proc, err)
        assert {(f["deployment_id"], f["state_type"]) for f in flow_runs} == {(deployment["id"], "COMPLETED")}
        assert len(flow_runs) == len(runs)
        family |= set(proc_ps.children(recursive=True))

        # SIGTERM while a run's process is alive: the run finishes and records its end before serve
        # stops the Prefect server it started (a run that loses its API mid-way cannot)
        wait_for("a run in progress", lambda: flow_run_processes(proc.pid), RUN_TIMEOUT, proc, err)
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT)
        stopped = time.monotonic() - stop
        assert code == 0, err.read_text()
        assert "Traceback" not in err.read_text(), err.read_text()
        con = duckdb.connect(str(db), read_only=True)
        statuses = {status for (status,) in con.execute("SELECT status FROM runs").fetchall()}
        con.close()
        assert statuses == {"completed"}, statuses
        gone, alive = psutil.wait_procs([p for p in family if p.pid != proc.pid], timeout=10)
        assert not alive, f"left running after serve exited: {alive}"
        assert not login.exists()
        print(f"serving after {ready:.1f} s, first run done at {first_run:.1f} s, new file inferred "
              f"{picked_up:.1f} s after it landed, stopped {stopped:.1f} s after SIGTERM, "
              f"total {time.monotonic() - t0:.1f} s")
    finally:
        if proc.poll() is None:
            try:
                family |= set(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:  # the Prefect server runs in a session of its own
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)
