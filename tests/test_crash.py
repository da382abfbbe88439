"""Crash safety: SIGKILL the run at each stage, run again, get exactly the tables of a clean run."""
from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

COMPARED = {  # tables and the columns that must match a clean run (run ids, load ids and times differ)
    "classifications": "* EXCLUDE (run_id, load_id)",
    "entities": "* EXCLUDE (run_id, load_id)",
    "failed_docs": "* EXCLUDE (run_id)",
    "doc_state": "* EXCLUDE (run_id, updated_at, load_id)",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("crash")
    (root / "corpus").mkdir()
    words = "Ada Lovelace founded Initech in Zurich while Grace Hopper ran Globex from Lagos".split()
    rows = [{"id": i, "text": " ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 11))}
            for i in range(30)]
    rows[4]["text"] = ""  # a bad row must survive crashes as exactly one failed_docs row
    pq.write_table(pa.Table.from_pylist(rows), root / "corpus" / "docs.parquet")
    (root / "pipeline.toml").write_text(f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 6
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
""")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("TASKHEADS_KILL_AT", None)
    return root, env


def run_cli(root, env, db, kill_at=None):
    e = dict(env)
    if kill_at:
        e["TASKHEADS_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "taskheads.cli", "run", str(root / "pipeline.toml"), "--db", db],
                          env=e, capture_output=True, text=True, timeout=600)


def tables(db):
    from storage.db import connect

    con = connect(db, read_only=True)  # a file or a lake
    try:
        return {t: con.execute(f"SELECT {cols} FROM {t} ORDER BY ALL").fetchall() for t, cols in COMPARED.items()}
    finally:
        con.close()


@pytest.fixture(scope="module")
def clean(setup):
    root, env = setup
    db = str(root / "clean.duckdb")
    proc = run_cli(root, env, db)
    assert proc.returncode == 0, proc.stderr
    return tables(db)


@pytest.mark.parametrize("kill_at", ["infer:3", "staged:3", "load:3", "loaded:3", "staged:9"])
def test_killed_run_then_rerun_equals_clean_run(setup, clean, kill_at):
    root, env = setup
    db = str(root / f"killed-{kill_at.replace(':', '-')}.duckdb")
    killed = run_cli(root, env, db, kill_at)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = run_cli(root, env, db)
    assert resumed.returncode == 0, resumed.stderr
    assert tables(db) == clean
    con = duckdb.connect(db, read_only=True)
    statuses = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()]
    shards = con.execute("SELECT count(*), count(DISTINCT shard_id) FROM loaded_shards").fetchone()
    con.close()
    assert statuses == ["interrupted", "completed"]
    assert shards[0] == shards[1]  # no package loaded twice
    assert not any((root / (os.path.basename(db) + ".staging")).glob("*/*"))  # nothing left behind
    # a package staged (or mid-load) when the run died is loaded by the next run, not recomputed
    # (units run concurrently, so a kill elsewhere may also leave other units' packages staged)
    if kill_at.startswith(("staged", "load:")):
        assert "recovered" in resumed.stdout


@pytest.mark.parametrize("kill_at", ["staged:3", "claimed:2", "load:3", "loaded:3"])
def test_killed_lake_run_then_rerun_equals_clean_run(setup, clean, kill_at):
    """The same on a DuckLake (SQLite catalog), where the units' tasks commit their own packages: a kill
    between staging and loading, after the claim, before or after the commit."""
    from storage.db import connect

    root, env = setup
    name = f"killed-lake-{kill_at.replace(':', '-')}"
    db = f"ducklake:sqlite:{root / name}.sqlite"
    killed = run_cli(root, env, db, kill_at)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = run_cli(root, env, db)
    assert resumed.returncode == 0, resumed.stderr
    assert tables(db) == clean
    con = connect(db, read_only=True)
    statuses = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()]
    shards = con.execute("SELECT count(*), count(DISTINCT shard_id) FROM loaded_shards").fetchone()
    con.close()
    assert statuses == ["interrupted", "completed"]
    assert shards[0] == shards[1]  # no package loaded twice
    assert not any((root / f"{name}.sqlite.staging").glob("*/*"))  # nothing left behind
