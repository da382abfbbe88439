"""Readers while a writer holds the database: wait, then read; or give up with a clear message."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from storage import db
from taskheads.cli import main
from heads.registry import result_tables

TABLES = result_tables()  # every registered head's result table

HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def hold_lock(path: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture()
def database(tmp_path):
    path = str(tmp_path / "r.duckdb")
    db.ensure_schema(path, tables=TABLES)
    return path


def test_sql_waits_for_the_writer_then_answers(database, capsys):
    holder = hold_lock(database, 1.5)
    t0 = time.monotonic()
    assert main(["sql", database, "SELECT count(*) AS n FROM classifications", "--wait", "20"]) == 0
    assert time.monotonic() - t0 > 0.5  # it really waited for the lock
    assert "(1 row)" in capsys.readouterr().out
    holder.wait()


def test_sql_gives_up_with_a_clear_message(database, capsys):
    holder = hold_lock(database, 5)
    try:
        assert main(["sql", database, "SELECT 1", "--wait", "0.5"]) == 1
        err = capsys.readouterr().err
        assert "locked by another process" in err and "try again" in err and err.count("\n") == 1
    finally:
        holder.kill()


def test_writer_connect_waits_too(database):
    holder = hold_lock(database, 1.0)
    con = db.connect(database, wait_seconds=20)
    con.close()
    holder.wait()
    holder = hold_lock(database, 5)
    try:
        with pytest.raises(db.DatabaseBusy):
            db.connect(database, wait_seconds=0.3)
    finally:
        holder.kill()


def test_second_run_on_the_same_database_is_refused(database):
    with db.run_lock(database):
        with pytest.raises(db.DatabaseBusy, match="another taskheads run is writing"):
            with db.run_lock(database):
                pass
    with db.run_lock(database):  # released on exit
        pass


def test_load_task_retries_transient_errors_only(prefect_harness, monkeypatch):
    import tasks.load as load_tasks

    calls = []

    def flaky(database, manifest, tables=()):
        calls.append(manifest)
        if manifest == "busy" and len(calls) == 1:
            raise db.DatabaseBusy("locked")
        if manifest == "broken":
            raise ValueError("not transient")
        return 3, 0

    monkeypatch.setattr(load_tasks.db, "load_shard", flaky)
    fast = load_tasks.load_shard.with_options(retry_delay_seconds=0)
    assert fast("x.duckdb", "busy") == (3, 0) and calls == ["busy", "busy"]
    calls.clear()
    with pytest.raises(ValueError):
        fast("x.duckdb", "broken")
    assert calls == ["broken"]  # terminal: no retry
