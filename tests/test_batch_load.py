"""Loads keep up: packages that queue load several to a transaction, exactly once, and give the tables
loading them one at a time (`load_shard`, the reference) gives."""
from __future__ import annotations

import time

import duckdb
import pytest

from heads.registry import result_tables, table
from storage import db
from storage.staging import stage_shard

TABLES = result_tables()
COMPARED = {"classifications": "* EXCLUDE (run_id, load_id)", "doc_state": "* EXCLUDE (updated_at, load_id)",
            "failed_docs": "*", "loaded_shards": "shard_id, run_id, head, result_rows, failed_rows"}


def _row(doc, label, run):
    return {"head": "topic", "doc_id": doc, "label": label, "score": 0.5, "scores": {label: 0.5}, "n_chunks": 1,
            "long_text": "chunk", "run_id": run, "model_id": "m"}


def _failed(doc, run):
    return {"head": "topic", "doc_id": doc, "source_file": "c.parquet", "source_row": int(doc), "stage": "forward",
            "kind": "transient", "error": "boom", "run_id": run, "model_id": "m", "fingerprint": "fp-" + doc}


def _packages(folder):
    """Three runs' packages in the order they were staged: disjoint ones, then one re-covering documents
    of the first (its rows must win), with a failure among them."""
    specs = [("r1", "s1", {"1": "a", "2": "b"}, []), ("r1", "s2", {"3": "c"}, ["4"]),
             ("r2", "s3", {"5": "e"}, []), ("r3", "s4", {"1": "z"}, ["2"])]
    out = []
    for run, shard, done, failed in specs:
        d = folder / run
        d.mkdir(parents=True, exist_ok=True)
        covered = [{"doc_id": k, "fingerprint": "fp-" + k, "status": "done"} for k in done] + \
                  [{"doc_id": k, "fingerprint": "fp-" + k, "status": "failed"} for k in failed]
        out.append(stage_shard(d, shard, "topic", table("classifications"), "m",
                               [_row(k, v, run) for k, v in done.items()], [_failed(k, run) for k in failed],
                               covered, run))
        time.sleep(0.01)  # staged in this order (the loader goes by the files' times)
    return out


def _tables(database):
    con = duckdb.connect(database, read_only=True)
    try:
        return {t: con.execute(f"SELECT {c} FROM {t} ORDER BY ALL").fetchall() for t, c in COMPARED.items()}
    finally:
        con.close()


def _failed_schema_columns():
    from storage.schema import FAILED_SCHEMA

    return FAILED_SCHEMA.names


def test_queued_packages_load_together_as_one_at_a_time_would(tmp_path, monkeypatch):
    assert set(_failed("4", "r")) <= set(_failed_schema_columns())
    reference = str(tmp_path / "ref.duckdb")
    db.ensure_schema(reference, tables=TABLES)
    for m in _packages(tmp_path / "ref.duckdb.staging"):
        db.load_shard(reference, m, tables=TABLES)
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    _packages(tmp_path / "r.duckdb.staging")
    replaced = []
    real = db._replace_docs
    monkeypatch.setattr(db, "_replace_docs", lambda con, t, h, packages, *rest: (replaced.append(len(packages)),
                                                                                 real(con, t, h, packages, *rest)))
    got = db.load_staged(database, tables=TABLES)
    assert replaced == [3, 1]  # s1-s3 together, then s4 (it re-covers a document of s1)
    assert got.packages == 4 and got.waiting == 0 and got.busy is None
    assert _tables(database) == _tables(reference)
    rows = dict(duckdb.connect(database, read_only=True).execute("SELECT doc_id, label FROM classifications").fetchall())
    assert rows == {"1": "z", "2": "b", "3": "c", "5": "e"}  # the latest package wins; a failure deletes nothing
    # loaded once: staging the same packages again loads nothing
    _packages(tmp_path / "r.duckdb.staging")
    again = db.load_staged(database, tables=TABLES)
    assert again.packages == 0 and _tables(database) == _tables(reference)


def test_a_batch_is_one_transaction(tmp_path, monkeypatch):
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    _packages(tmp_path / "r.duckdb.staging")
    calls = []

    def die_on_third(stage):
        calls.append(stage)
        if stage == "load" and calls.count("load") == 3:
            raise KeyboardInterrupt("killed mid-batch")

    monkeypatch.setattr(db, "checkpoint", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        db.load_staged(database, tables=TABLES)
    con = duckdb.connect(database, read_only=True)
    assert con.execute("SELECT count(*) FROM loaded_shards").fetchone() == (0,)  # all or nothing
    assert con.execute("SELECT count(*) FROM classifications").fetchone() == (0,)
    con.close()
    monkeypatch.undo()
    assert db.load_staged(database, tables=TABLES).packages == 4


def test_loads_write_row_groups_small_enough_to_compress_in_little_memory(tmp_path):
    """Each load's checkpoint compresses the row group it appended to, whole: in DuckDB's default groups of
    122,880 rows that took ~80MB per table once a group filled (a first run's peak memory then rose with
    the corpus past ~123k documents). The loader's writes keep groups at 16,384 rows at most."""
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    run = tmp_path / "r.duckdb.staging" / "r1"
    for k in range(14):  # 140,000 documents (more than a group of DuckDB's), a package at a time as a run loads
        run.mkdir(parents=True, exist_ok=True)  # (the loader clears a finished folder)
        docs = [str(k * 10_000 + i) for i in range(10_000)]
        stage_shard(run, f"s{k}", "topic", table("classifications"), "m", [_row(d, "a", "r1") for d in docs], [],
                    [{"doc_id": d, "fingerprint": "fp-" + d, "status": "done"} for d in docs], "r1")
        assert db.load_staged(database, tables=TABLES).packages == 1
    con = duckdb.connect(database, read_only=True)
    try:
        for name in ("classifications", "doc_state"):
            groups = con.execute("SELECT row_group_id, sum(count) FROM pragma_storage_info(?) WHERE column_id = 0 "
                                 "AND segment_type <> 'VALIDITY' GROUP BY ALL", [name]).fetchall()
            assert sum(n for _, n in groups) == 140_000, name
            assert max(n for _, n in groups) <= 16_384, (name, groups)
    finally:
        con.close()


def test_failures_count_attempts_and_are_replaced_by_document_or_source_row(tmp_path):
    """What a load does to `failed_docs`, whichever way it finds the rows to replace: a document that
    fails again on the same text and model counts up, a new model starts again at 1, a row without an id
    is replaced by a failure at the same place in the same file, a success clears its document's
    failures, and nothing of another head or place is touched."""
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    folder = tmp_path / "r.duckdb.staging" / "r"
    folder.mkdir(parents=True)
    no_id = {**_failed("9", "r"), "doc_id": None, "stage": "plan", "kind": "terminal", "error": "no id"}

    def load(name, done=(), failed=(), model="m"):
        failed = [{**f, "model_id": model} for f in failed]
        covered = [{"doc_id": k, "fingerprint": "fp-" + k, "status": "done"} for k in done] + \
                  [{"doc_id": f["doc_id"], "fingerprint": f["fingerprint"], "status": "failed"}
                   for f in failed if f["doc_id"] is not None]
        db.load_shard(database, stage_shard(folder, name, "topic", table("classifications"), model,
                                            [_row(k, "a", "r") for k in done], failed, covered, "r"), tables=TABLES)

    def failures():
        con = duckdb.connect(database, read_only=True)
        try:
            return con.execute("SELECT head, doc_id, source_row, model_id, attempts FROM failed_docs "
                               "ORDER BY head, doc_id NULLS FIRST").fetchall()
        finally:
            con.close()

    con = duckdb.connect(database)
    con.execute("INSERT INTO failed_docs BY NAME SELECT 'people' AS head, '7' AS doc_id, 'c.parquet' AS source_file, "
                "9 AS source_row, 'forward' AS stage, 'terminal' AS kind, 'x' AS error, 'm' AS model_id, 1 AS attempts")
    con.close()
    load("s1", failed=[_failed("7", "r"), _failed("8", "r"), no_id])
    assert failures() == [("people", "7", 9, "m", 1), ("topic", None, 9, "m", 1), ("topic", "7", 7, "m", 1),
                          ("topic", "8", 8, "m", 1)]
    load("s2", failed=[_failed("7", "r"), no_id])  # again: 7 counts up, the id-less row is replaced
    assert failures() == [("people", "7", 9, "m", 1), ("topic", None, 9, "m", 1), ("topic", "7", 7, "m", 2),
                          ("topic", "8", 8, "m", 1)]
    load("s3", failed=[_failed("7", "r")], model="m2")  # another model: a first attempt
    assert failures() == [("people", "7", 9, "m", 1), ("topic", None, 9, "m", 1), ("topic", "7", 7, "m2", 1),
                          ("topic", "8", 8, "m", 1)]
    load("s4", done=["7"])  # a success clears its document's failures only
    load("s5", done=["1"])  # and a package without failures leaves them all
    assert failures() == [("people", "7", 9, "m", 1), ("topic", None, 9, "m", 1), ("topic", "8", 8, "m", 1)]
