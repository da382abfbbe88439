"""A reader never costs a run: another process holding the `.duckdb` file while a run writes.

Each test holds the file from a separate process (DuckDB's lock is per process) and checks the run's
exit code, its status and the stored tables against a clean run of the same corpus on a database
nobody held (the independent reference).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taskheads.cli import main

COMPARED = {"classifications": "* EXCLUDE (run_id, load_id)", "entities": "* EXCLUDE (run_id, load_id)",
            "doc_state": "* EXCLUDE (run_id, updated_at, load_id)"}

HOLDER = """
import pathlib, sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
pathlib.Path(sys.argv[3]).write_text("ready")
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    con.execute("SELECT count(*) FROM runs").fetchall()  # an analyst's query now and then
    time.sleep(0.2)
con.close()
"""

WORDS = "Ada Lovelace founded Initech in Zurich while Grace Hopper ran Globex from Lagos".split()


def _rows(lo: int, hi: int) -> list[dict]:
    return [{"id": i, "text": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))}
            for i in range(lo, hi)]


class Holder:
    """Another process with the database open (read-only or read-write) for `seconds`."""

    def __init__(self, db: str, mode: str, seconds: float, tmp: Path) -> None:
        ready = tmp / f"ready-{time.monotonic_ns()}"
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, db, mode, str(ready), str(seconds)])
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.proc.poll() is None, "holder died"
            assert time.monotonic() < deadline, "holder never opened the database"
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


_BASES: dict = {}


def _project(root: Path, tiny_models, tmp_path_factory, *, ner_where: str | None = None, load_wait: float = 2) -> Path:
    """A config over a 24-document corpus whose database already holds the first 12 (a first run made
    once per module and copied), and a reference: a clean run of the whole corpus nobody held."""
    ner = f"""
[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
where = "{ner_where}"
""" if ner_where else ""
    body = f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 4
load_wait = {load_wait}
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
{ner}"""
    if ner_where not in _BASES:
        base = tmp_path_factory.mktemp("held-base")
        (base / "corpus").mkdir()
        (base / "first").mkdir()
        pq.write_table(pa.Table.from_pylist(_rows(0, 12)), base / "first" / "a.parquet")
        pq.write_table(pa.Table.from_pylist(_rows(0, 12)), base / "corpus" / "a.parquet")
        pq.write_table(pa.Table.from_pylist(_rows(12, 24)), base / "corpus" / "b.parquet")
        (base / "pipeline.toml").write_text(body)
        assert main(["run", str(base / "pipeline.toml"), "--corpus", str(base / "first"), "--no-progress"]) == 0
        assert main(["run", str(base / "pipeline.toml"), "--db", str(base / "reference.duckdb"), "--no-progress"]) == 0
        _BASES[ner_where] = base
    base = _BASES[ner_where]
    shutil.copytree(base / "corpus", root / "corpus")
    shutil.copy(base / "results.duckdb", root / "results.duckdb")
    (root / "pipeline.toml").write_text(body)
    return root / "pipeline.toml"


def _reference(ner_where: str | None = None) -> dict:
    return _tables(_BASES[ner_where] / "reference.duckdb")


def _tables(db) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        return {t: con.execute(f"SELECT {c} FROM {t} ORDER BY ALL").fetchall() for t, c in COMPARED.items()
                if t in present}
    finally:
        con.close()


def _one(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _staged(root: Path) -> list[Path]:
    return [p for p in (root / "results.duckdb.staging").glob("*/*") if p.parent.name != "quarantine"]


@pytest.mark.parametrize("then", ["load", "next_run"])
def test_a_reader_held_through_a_run_costs_nothing(tmp_path, tmp_path_factory, tiny_models, prefect_harness, capsys, then):
    cfg = _project(tmp_path, tiny_models, tmp_path_factory)
    db = tmp_path / "results.duckdb"
    reference = _reference()
    capsys.readouterr()
    holder = Holder(str(db), "ro", 600, tmp_path)
    try:
        t0 = time.monotonic()
        code = main(["run", str(cfg), "--no-progress"])
        took = time.monotonic() - t0
        out = capsys.readouterr().out
    finally:
        holder.close()
    assert code == 0, out
    assert "status completed_pending_load" in out
    line = next(x for x in out.splitlines() if "wait" in x and "taskheads load" in x)
    assert line.split()[0].isdigit() and int(line.split()[0]) > 0, line
    assert took < 60  # load_wait is 2 s: the run did not wait 30 s per write
    assert _staged(tmp_path)  # the packages are on disk, not lost
    assert _one(db, "SELECT count(*) FROM classifications WHERE doc_id::INTEGER >= 12") == [(0,)]
    if then == "load":
        assert main(["load", str(cfg)]) == 0
        assert _tables(db) == reference
        assert not _staged(tmp_path)
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress", "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed"
    assert summary["heads"]["topic"]["inferred"] == 0  # the waiting packages were loaded, not recomputed
    assert _tables(db) == reference  # every row exactly once
    (n, distinct), = _one(db, "SELECT count(*), count(DISTINCT shard_id) FROM loaded_shards")
    assert n == distinct
    statuses = [r[0] for r in _one(db, "SELECT status FROM runs ORDER BY started_at")]
    assert statuses == ["completed", "completed_pending_load", "completed"]
    assert not _staged(tmp_path)


def test_a_reader_that_closes_mid_run_lets_everything_load_in_that_run(tmp_path, tmp_path_factory, tiny_models,
                                                                        prefect_harness, capsys):
    cfg = _project(tmp_path, tiny_models, tmp_path_factory, load_wait=60)
    db = tmp_path / "results.duckdb"
    reference = _reference()
    capsys.readouterr()
    holder = Holder(str(db), "ro", 4, tmp_path)  # closes by itself after 4 s
    try:
        code = main(["run", str(cfg), "--no-progress"])
        out = capsys.readouterr().out
        assert holder.proc.poll() is not None  # the run outlasted the reader
    finally:
        holder.close()
    assert code == 0, out
    assert "status completed " in out + " "
    assert _tables(db) == reference
    assert not _staged(tmp_path)


def test_a_read_write_holder_makes_the_run_exit_75_and_lose_nothing(tmp_path, tmp_path_factory, tiny_models,
                                                                    prefect_harness, capsys):
    cfg = _project(tmp_path, tiny_models, tmp_path_factory)
    db = tmp_path / "results.duckdb"
    reference = _reference()
    before = _tables(db)
    capsys.readouterr()
    holder = Holder(str(db), "rw", 600, tmp_path)
    try:
        t0 = time.monotonic()
        code = main(["run", str(cfg), "--no-progress"])
        took = time.monotonic() - t0
        err = capsys.readouterr().err
    finally:
        holder.close()
    assert code == 75, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "results.duckdb" in lines[0] and "read-write" in lines[0] and "lock" in lines[0]
    assert 2 <= took < 60  # it waited load_wait, not forever
    assert _tables(db) == before
    assert main(["run", str(cfg), "--no-progress"]) == 0  # nothing lost: the next run does it all
    assert _tables(db) == reference


def test_a_level_reading_upstream_results_is_deferred_while_the_file_is_held(tmp_path, tmp_path_factory,
                                                                             tiny_models, prefect_harness, capsys):
    cfg = _project(tmp_path, tiny_models, tmp_path_factory, ner_where="topic.label IS NOT NULL")
    db = tmp_path / "results.duckdb"
    reference = _reference("topic.label IS NOT NULL")
    capsys.readouterr()
    holder = Holder(str(db), "ro", 600, tmp_path)
    try:
        code = main(["run", str(cfg), "--no-progress", "--json"])
        out = capsys.readouterr().out
    finally:
        holder.close()
    assert code == 0
    import json

    summary = json.loads(out)
    assert summary["status"] == "completed_pending_load"
    assert summary["deferred"] == ["people"]
    assert summary["heads"]["topic"]["inferred"] == 12 and summary["heads"]["people"]["inferred"] == 0
    assert main(["run", str(cfg), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["deferred"] == []
    assert summary["heads"]["topic"]["inferred"] == 0 and summary["heads"]["people"]["inferred"] == 12
    assert _tables(db) == reference


def test_the_summary_names_deferred_heads(tiny_models):
    from taskheads.cli import format_summary

    s = {"run_id": "r", "status": "completed_pending_load", "database": "x.duckdb", "docs_read": 1, "files": 1,
         "wall_seconds": 1.0, "heads": {}, "file_errors": [], "deferred": ["people"], "pending_packages": 3,
         "config": "p.toml"}
    text = format_summary(s)
    assert "people" in text and "deferred to the next run" in text
    assert "3 load package(s) wait" in text and "taskheads load p.toml" in text
