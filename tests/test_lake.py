"""The DuckLake backend (issue 15): the same tables as a `.duckdb` file, readers and writers at once.

Catalogs: SQLite (a file) and PostgreSQL (a private server the `postgres` fixture starts). Every
comparison is against a clean run of the same config into a `.duckdb` file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.names import quote
from storage import db

WORDS = "Ada Lovelace founded Initech in Zurich while Grace Hopper ran Globex from Lagos".split()
READER = r"""
import json, os, sys, time
import taskheads
from storage.db import exists
lake, out, stop = sys.argv[1:4]
deadline = time.monotonic() + 300
while True:  # until the run made the lake; then one connection for the whole run
    try:
        if exists(lake):
            with taskheads.connect(lake) as con:
                con.execute("SELECT count(*) FROM loaded_shards").fetchall()
                break
    except Exception:
        if time.monotonic() > deadline:
            raise
    time.sleep(0.05)
with taskheads.connect(lake) as con, open(out, "w") as f:
    while True:
        last = os.path.exists(stop)
        row = con.execute(
            "SELECT (SELECT coalesce(sum(result_rows), 0) FROM loaded_shards WHERE head = 'topic'), "
            "(SELECT count(*) FROM classifications), (SELECT count(*) FROM doc_state WHERE head = 'topic'), "
            "(SELECT coalesce(sum(result_rows), 0) FROM loaded_shards WHERE head = 'people'), "
            "(SELECT count(*) FROM entities), (SELECT count(*) FROM doc_state)").fetchone()
        f.write(json.dumps(list(map(int, row))) + "\n")
        f.flush()
        if last:
            break
        time.sleep(0.05)
"""
LOADER = r"""
import sys
import pyarrow as pa
from core.tables import ResultTable
from storage import db
T = ResultTable("classifications", (pa.field("label", pa.string()), pa.field("score", pa.float64())))
print(list(db.load_shard(sys.argv[1], sys.argv[2], tables=[T])))
"""


def snapshot(database: str) -> dict[str, list]:
    """Every result table, failed_docs and doc_state (all columns but run and load ids, times and source files),
    sorted; and the table and view names."""
    from storage.views import result_tables_in

    con = db.connect(database, read_only=True)
    try:
        out = {}
        for table in [*result_tables_in(con), "failed_docs", "doc_state"]:
            cols = [c for (c,) in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() AND table_name = ? "
                "ORDER BY column_index", [table]).fetchall() if c not in ("run_id", "updated_at", "source_file", "load_id")]
            out[table] = sorted(map(repr, con.execute(f"SELECT {', '.join(map(quote, cols))} FROM {table}").fetchall()))
        out["tables"] = sorted(r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()
            if r[0] != "taskheads_claims")  # a lake's own
        out["views"] = sorted(r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE database_name = current_database() AND NOT internal").fetchall())
        return out
    finally:
        con.close()


def fetch(database: str, sql: str, params=()) -> list[tuple]:
    con = db.connect(database, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("lake")
    (root / "corpus").mkdir()
    rows = [{"id": i, "text": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 11))}
            for i in range(40)]
    rows[4]["text"] = ""  # one bad row: exactly one failed_docs row on every backend
    pq.write_table(pa.Table.from_pylist(rows[:20]), root / "corpus" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:]), root / "corpus" / "b.parquet")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for k in ("TASKHEADS_KILL_AT", "TASKHEADS_PAUSE_AT"):
        env.pop(k, None)
    return root, env, tiny_models


def write_config(root: Path, name: str, database: str, models: dict, heads=("topic", "people"), extra: str = "") -> Path:
    text = f'corpus = "corpus"\ndatabase = "{database}"\nunit_docs = 4\n{extra}\n'
    if "topic" in heads:
        text += f'[heads.topic]\ntask = "classification"\nmodel = "{models["classification"]}"\n'
    if "people" in heads:
        text += f'[heads.people]\ntask = "ner"\nmodel = "{models["ner"]}"\n'
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def run_cli(config: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskheads.cli", "run", str(config), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=config.parent)


@pytest.fixture(scope="module")
def clean(setup):
    root, env, models = setup
    proc = run_cli(write_config(root, "clean", "clean.duckdb", models), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return snapshot(str(root / "clean.duckdb"))


def _lake(root: Path, catalog: str, postgres, name: str) -> tuple[str, str]:
    """(lake, extra config keys) for a new lake on that catalog."""
    if catalog == "sqlite":
        return f"ducklake:sqlite:{name}.sqlite", ""
    return postgres.catalog(), f'data_path = "{name}-data"\nstaging = "{name}-staging"'


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_lake_run_and_rerun_match_a_duckdb_file_while_a_reader_polls(setup, clean, catalog, request):
    root, env, models = setup
    postgres = request.getfixturevalue("postgres") if catalog == "postgres" else None
    lake, extra = _lake(root, catalog, postgres, f"run-{catalog}")
    config = write_config(root, f"run-{catalog}", lake, models, extra=extra)
    database = lake if catalog == "postgres" else f"ducklake:sqlite:{root / f'run-{catalog}.sqlite'}"
    out, stop = root / f"reader-{catalog}.jsonl", root / f"stop-{catalog}"
    reader = subprocess.Popen([sys.executable, "-c", READER, database, str(out), str(stop)], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = run_cli(config, env)
        assert first.returncode == 0, first.stderr[-3000:]
    finally:
        stop.touch()
        _, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-3000:]
    assert snapshot(database) == clean
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    for topic_rows, classifications, topic_docs, people_rows, entities, _ in seen:
        # only whole packages: a package's rows, its doc_state and its marker appear together
        assert topic_rows == classifications == topic_docs and people_rows == entities
    final = fetch(database, "SELECT (SELECT count(*) FROM doc_state)")[0][0]
    assert seen[-1][5] == final > 0  # the final results, on the connection held since the start
    assert len({tuple(s) for s in seen}) >= 3  # and states between: it saw the run progress
    assert all(a[5] <= b[5] for a, b in zip(seen, seen[1:]))
    again = run_cli(config, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(database) == clean
    (inferred,), = fetch(str(root / "clean.duckdb"), "SELECT docs_inferred FROM runs")
    assert fetch(database, "SELECT status, docs_inferred FROM runs ORDER BY started_at") == [
        ("completed", inferred), ("completed", 0)]  # then nothing to do
    # every loaded package has its claim marked loaded, and no other: compared as sets of packages, since two
    # loaders claiming one package at the same moment may each insert a claim row (a lake has no keys;
    # the load itself stays once: the claim UPDATE conflicts)
    claimed = {r[0] for r in fetch(database, "SELECT package FROM taskheads_claims WHERE loaded_by IS NOT NULL")}
    loaded = fetch(database, "SELECT shard_id FROM loaded_shards")
    assert claimed == {r[0] for r in loaded} and len(loaded) == len(claimed)


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_two_processes_loading_one_package_at_once_load_it_once(tmp_path, catalog, request):
    from core.tables import ResultTable
    from storage.staging import stage_shard, staging_dir

    postgres = request.getfixturevalue("postgres") if catalog == "postgres" else None
    lake = f"ducklake:sqlite:{tmp_path / 'l.sqlite'}" if catalog == "sqlite" else postgres.catalog()
    staging = None if catalog == "sqlite" else str(tmp_path / "staging")
    table = ResultTable("classifications", (pa.field("label", pa.string()), pa.field("score", pa.float64())))
    db.ensure_schema(lake, tables=[table], data_path=None if catalog == "sqlite" else str(tmp_path / "data"))
    rows = [{"head": "topic", "doc_id": f"d{i}", "label": "x", "score": 0.5, "run_id": "r1", "model_id": "m"}
            for i in range(50)]
    covered = [{"doc_id": f"d{i}", "fingerprint": "f", "status": "done"} for i in range(50)]
    manifest = stage_shard(staging_dir(lake, "r1", staging), "r1-topic-0", "topic", table, "m", rows, [], covered, "r1")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TASKHEADS_KILL_AT", None)
    # the first pauses inside its load transaction (claim updated, nothing else written); the second loads
    # and commits meanwhile; the first's commit then conflicts, and its retry finds the package loaded
    slow = subprocess.Popen([sys.executable, "-c", LOADER, lake, manifest], env={**env, "TASKHEADS_PAUSE_AT": "claimed:8"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    fast = subprocess.run([sys.executable, "-c", LOADER, lake, manifest], env=env, capture_output=True, text=True,
                          timeout=120)
    out, err = slow.communicate(timeout=120)
    assert fast.returncode == 0, fast.stderr[-3000:]
    assert slow.returncode == 0, err[-3000:]
    assert json.loads(fast.stdout) == [50, 0] and json.loads(out) == [0, 0]  # overlapped: the slow one lost
    assert fetch(lake, "SELECT count(*), count(DISTINCT doc_id) FROM classifications") == [(50, 50)]
    assert fetch(lake, "SELECT count(*) FROM doc_state") == [(50,)]
    assert fetch(lake, "SELECT count(*) FROM loaded_shards") == [(1,)]


def test_two_runs_with_different_heads_on_one_lake_at_once(setup, clean):
    root, env, models = setup
    lake = "ducklake:sqlite:together.sqlite"
    a = write_config(root, "together-topic", lake, models, heads=("topic",))
    b = write_config(root, "together-people", lake, models, heads=("people",))
    cmd = [sys.executable, "-m", "taskheads.cli", "run"]
    procs = [subprocess.Popen([*cmd, str(c), "--no-progress"], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in (a, b)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    database = f"ducklake:sqlite:{root / 'together.sqlite'}"
    runs = fetch(database, "SELECT status, started_at, finished_at FROM runs")
    assert [r[0] for r in runs] == ["completed", "completed"]  # neither marked the other interrupted
    assert max(r[1] for r in runs) < min(r[2] for r in runs)  # they did run at once
    assert snapshot(database) == clean


def test_dask_workers_commit_their_own_packages(setup, clean, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from taskheads.cli import main

    root, env, models = setup
    config = write_config(root, "dask", "ducklake:sqlite:dask.sqlite", models)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.chdir(root)
    assert main(["run", str(config), "--runner", "dask", "--workers", "2", "--no-progress"]) == 0
    database = f"ducklake:sqlite:{root / 'dask.sqlite'}"
    assert snapshot(database) == clean
    loaders = {r[0] for r in fetch(database, "SELECT loaded_by FROM taskheads_claims WHERE loaded_by IS NOT NULL")}
    workers = {w.split(":")[1] for w in loaders} - {str(os.getpid())}
    assert len(workers) >= 2, loaders  # the worker processes committed packages, not only this one


def test_migrate_copies_a_duckdb_file_into_a_lake(setup, clean, capsys):
    from taskheads.cli import main

    root, _, _ = setup
    lake = f"ducklake:sqlite:{root / 'migrated.sqlite'}"
    assert main(["migrate", str(root / "clean.duckdb"), lake]) == 0
    assert "copied" in capsys.readouterr().out
    assert snapshot(lake) == clean
    for table in ("runs", "models", "loaded_shards", "evaluations"):
        cols = "* EXCLUDE (loaded_at)" if table == "loaded_shards" else "*"
        assert sorted(map(repr, fetch(lake, f"SELECT {cols} FROM {table}"))) == \
            sorted(map(repr, fetch(str(root / "clean.duckdb"), f"SELECT {cols} FROM {table}")))
    assert main(["migrate", str(root / "clean.duckdb"), lake]) == 2  # not into a lake that holds results
    assert "already holds" in capsys.readouterr().err


def test_sql_at_run_and_compact(setup, capsys):
    from taskheads.cli import main

    root, env, models = setup
    config = write_config(root, "history", "ducklake:sqlite:history.sqlite", models, heads=("topic",))
    first = run_cli(config, env, "--corpus", str(root / "corpus" / "a.parquet"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(config, env)
    assert second.returncode == 0, second.stderr[-3000:]
    lake = f"ducklake:sqlite:{root / 'history.sqlite'}"
    (run1,), (run2,) = fetch(lake, "SELECT run_id FROM runs ORDER BY started_at")
    count = "SELECT count(*) AS n FROM doc_state"
    assert main(["sql", lake, count, "--format", "json", "--at-run", run1]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 19}]  # a.parquet: 20 rows, one bad
    assert main(["sql", lake, count, "--format", "json", "--at-run", run2]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 39}]
    assert main(["sql", lake, count, "--at-run", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert main(["sql", str(root / "clean.duckdb"), count, "--at-run", run1]) == 2  # a file keeps no history
    capsys.readouterr()
    before = snapshot(lake)
    assert main(["compact", lake]) == 0
    assert "merged" in capsys.readouterr().out
    assert snapshot(lake) == before
    assert main(["sql", lake, count, "--format", "json", "--at-run", run1]) == 0  # kept: younger than 7 days
    assert json.loads(capsys.readouterr().out) == [{"n": 19}]


def test_without_the_extension_wheels_a_lake_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys\nsys.modules['duckdb_extensions'] = None  # the lake extra not installed\n"
            "from storage import lake\ntry:\n    lake.connect(sys.argv[1])\nexcept lake.LakeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, f"ducklake:sqlite:{tmp_path / 'x.sqlite'}"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})  # no extensions in ~/.duckdb
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "taskheads[lake]" in lines[0] and "INSTALL ducklake" in lines[0], (out.stdout, out.stderr)


def test_lake_config_errors_are_one_line(tmp_path, tiny_models):
    from core.errors import ConfigError
    from pipeline.config import parse_config

    heads = {"topic": {"task": "classification", "model": tiny_models["classification"]}}
    cfg = parse_config({"corpus": "c", "database": "ducklake:sqlite:r.sqlite", "heads": heads}, tmp_path)
    assert cfg.database == f"ducklake:sqlite:{tmp_path / 'r.sqlite'}"  # relative to the config's folder
    with pytest.raises(ConfigError, match=r"^database: .*ducklake:sqlite:FILE or ducklake:postgres:CONNECTION"):
        parse_config({"corpus": "c", "database": "ducklake:mysql:x", "heads": heads}, tmp_path)
    with pytest.raises(ConfigError, match=r"^data_path: a DuckLake with a PostgreSQL catalog needs data_path"):
        parse_config({"corpus": "c", "database": "ducklake:postgres:dbname=r", "heads": heads}, tmp_path)
    with pytest.raises(ConfigError, match=r"^staging: "):
        parse_config({"corpus": "c", "database": "ducklake:postgres:dbname=r", "data_path": "d", "heads": heads},
                     tmp_path)


def test_a_catalog_file_another_run_has_only_just_made_counts_as_no_lake(tmp_path):
    """Two first runs at once: one has made the SQLite file (WAL mode) but not DuckLake's tables yet when
    the other looks. The other must neither take the lake for made (and read it) nor attach it without a
    data path (DuckLake: 'data_path is not set'); it makes the lake with the default data path too."""
    import sqlite3

    from storage import lake

    file = tmp_path / "half.sqlite"
    con = sqlite3.connect(file)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    database = f"ducklake:sqlite:{file}"
    assert not db.exists(database)
    db.ensure_schema(database, tables=[])
    assert db.exists(database)
    reader = lake.connect(database, read_only=True)
    try:
        path = reader.execute("SELECT value FROM ducklake_options(?) WHERE option_name = 'data_path'",
                              [lake.ALIAS]).fetchone()[0]
    finally:
        reader.close()
    assert path.rstrip("/") == lake.default_data_path(database).rstrip("/")


# --- a lake held per process: loads after the first do not connect again -------------------------------------
def _package(lake: str, shard: str, docs: range, label: str, staging: str | None = None) -> str:
    from heads.registry import table
    from storage.staging import stage_shard, staging_dir

    rows = [{"head": "topic", "doc_id": f"d{i}", "label": label, "score": 0.5, "scores": {label: 0.5}, "n_chunks": 1,
             "long_text": "chunk", "run_id": "r1", "model_id": "m"} for i in docs]
    covered = [{"doc_id": f"d{i}", "fingerprint": f"f{i}", "status": "done"} for i in docs]
    return stage_shard(staging_dir(lake, "r1", staging), shard, "topic", table("classifications"), "m", rows, [],
                       covered, "r1")


def _new_lake(tmp_path: Path, catalog: str, request, data: str | None = None) -> tuple[str, str | None]:
    from heads.registry import result_tables

    if catalog == "sqlite":
        lake, staging = f"ducklake:sqlite:{tmp_path / 'l.sqlite'}", None
    else:
        lake, staging, data = request.getfixturevalue("postgres").catalog(), str(tmp_path / "staging"), str(tmp_path / "data")
    db.ensure_schema(lake, tables=result_tables(), data_path=data)
    return lake, staging


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_a_process_attaches_a_lake_once_for_all_its_loads_and_threads_load_at_once(tmp_path, catalog, request,
                                                                                   monkeypatch):
    """A unit task commits its own package into a lake; connecting (loading DuckDB's extensions, attaching
    the catalog) cost about as much as the load. A process keeps the lake attached: every load after the
    first, from any thread, opens only a connection of its own on it (its own transaction), and each
    package still loads exactly once."""
    import threading

    from heads.registry import result_tables
    from storage import lake as lakes

    lake, staging = _new_lake(tmp_path, catalog, request)
    first = _package(lake, "first", range(0, 10), "old", staging)  # (staging a package can read the lake's id)
    attaches = []
    real_attach = lakes.attach
    monkeypatch.setattr(lakes, "attach", lambda con, database, *a, **k: (attaches.append(database),
                                                                          real_attach(con, database, *a, **k))[1])
    assert db.load_shard(lake, first, tables=result_tables()) == (10, 0)
    # four threads at once: three packages each, the first re-covering the first load's documents (their
    # DELETEs meet); each package a second time (a retry: nothing to do)
    specs = [[(f"t{t}-{k}", range(t * 30 + k * 10, t * 30 + k * 10 + 10), f"t{t}") for k in range(3)] for t in range(4)]
    loaded, errors = [], []

    def load(packages: list[tuple]) -> None:
        try:
            for spec in [*packages, *packages]:
                path = _package(lake, *spec, staging=staging)
                loaded.append(db.load_shard(lake, path, tables=result_tables())[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(loaded) == [0] * 12 + [10] * 12
    assert attaches == [lake]  # once, by the first load
    assert fetch(lake, "SELECT count(*), count(DISTINCT doc_id) FROM classifications") == [(120, 120)]
    assert fetch(lake, "SELECT label, count(*) FROM classifications GROUP BY ALL ORDER BY ALL") == \
        [("t0", 30), ("t1", 30), ("t2", 30), ("t3", 30)]
    assert fetch(lake, "SELECT count(*), count(DISTINCT doc_id) FROM doc_state") == [(120, 120)]
    assert fetch(lake, "SELECT count(*) FROM loaded_shards") == [(13,)]


def test_a_lake_made_again_at_the_same_path_is_loaded_into_not_the_old_one(tmp_path):
    """A process holds the lake it attached: a lake deleted and made again at the same path (a test, a user
    starting over, here with another data folder) still gets the process's next load, not the old one."""
    import shutil

    from heads.registry import result_tables

    lake, _ = _new_lake(tmp_path, "sqlite", None)
    assert db.load_shard(lake, _package(lake, "a", range(3), "old"), tables=result_tables()) == (3, 0)
    for path in tmp_path.iterdir():
        if path.name.startswith("l.sqlite") or path.is_dir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    lake, _ = _new_lake(tmp_path, "sqlite", None, data=str(tmp_path / "new-data"))  # (DuckLake keeps it in the catalog)
    assert db.load_shard(lake, _package(lake, "b", range(2), "new"), tables=result_tables()) == (2, 0)
    assert fetch(lake, "SELECT doc_id, label FROM classifications ORDER BY ALL") == [("d0", "new"), ("d1", "new")]


def test_a_lake_migrated_past_this_code_is_refused_by_a_process_that_holds_it(tmp_path):
    from core.errors import SchemaTooNew
    from heads.registry import result_tables
    from storage import lake as lakes, migrations

    lake, _ = _new_lake(tmp_path, "sqlite", None)
    assert db.load_shard(lake, _package(lake, "a", range(3), "old"), tables=result_tables()) == (3, 0)
    con = db.connect(lake)  # a newer taskheads, in another process, migrates the lake
    try:
        migrations._set(con, schema_version=migrations.SCHEMA_VERSION + 1)
    finally:
        con.close()
    with pytest.raises(SchemaTooNew):
        db.load_shard(lake, _package(lake, "b", range(3, 5), "new"), tables=result_tables())
    con = lakes.connect(lake, read_only=True)  # (db.connect refuses it too)
    try:
        assert con.execute("SELECT count(*) FROM classifications").fetchall() == [(3,)]
    finally:
        con.close()
