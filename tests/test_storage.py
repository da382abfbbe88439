"""Corpus reading, routing, staging and the transactional loader."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import db
from storage.corpus import CorpusError, Unit, corpus_files, plan_units, read_unit
from storage.staging import stage_shard


def test_corpus_files_file_folder_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["a.parquet", "sub/b.parquet"]:
        pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / name)
    (tmp_path / "notes.txt").write_text("not parquet")
    assert corpus_files(str(tmp_path / "a.parquet")) == [str(tmp_path / "a.parquet")]
    assert corpus_files(str(tmp_path)) == [str(tmp_path / "a.parquet"), str(tmp_path / "sub" / "b.parquet")]
    assert corpus_files(str(tmp_path / "**" / "*.parquet")) == corpus_files(str(tmp_path))
    with pytest.raises(CorpusError, match="no Parquet files found"):
        corpus_files(str(tmp_path / "none-*.parquet"))


def test_plan_units_splits_rows_and_names_bad_files(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "text": ["t"] * 10}), good, row_group_size=3)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:-20])  # truncated footer
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"id": [1]}), nocol)
    units, errors = plan_units([str(good), str(broken), str(nocol)], 4, ["id", "text"])
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10)]
    assert len(errors) == 2
    assert errors[0].startswith(f"{broken}: not a readable Parquet file")
    assert errors[1].startswith(f"{nocol}: missing column 'text'")
    # a unit crossing row groups reads exactly its rows
    data = read_unit(units[1], "id", "text", [], {"h": None})
    assert [d.doc_id for d in data.docs] == ["4", "5", "6", "7"]


def test_read_unit_routes_and_reports_invalid_rows(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({
        "id": [1, 2, None, 4, 5, 6],
        "text": ["good one", "  \t ", "no id", None, "", "second good"],
        "lang": ["en", "en", "en", "de", "en", "de"],
        "question": ["q1", None, None, None, None, "q6"],
    }), path)
    data = read_unit(Unit(str(path), 0, 6), "id", "text", ["question"], {"all": None, "en": "lang = 'en'"})
    assert [d.doc_id for d in data.docs] == ["1", "6"]
    assert data.docs[0].fields == {"question": "q1"}
    assert data.routes == {"all": [0, 1], "en": [0]}
    reasons = {(i["doc_id"], i["error"]) for i in data.invalid}
    assert reasons == {("2", "whitespace-only text"), (None, "null id (row 2 of c.parquet)"),
                       ("4", "null text"), ("5", "empty text")}
    by_id = {i["doc_id"]: i["heads"] for i in data.invalid}
    assert by_id["4"] == ["all"] and sorted(by_id["2"]) == ["all", "en"]


def _stage(tmp_path, shard, rows, covered, run="r1"):
    return stage_shard(tmp_path, shard, "topic", "classifications", rows, [], covered, run)


def _row(doc, label, run="r1"):
    return {"head": "topic", "doc_id": doc, "label": label, "score": 0.5, "scores": {label: 0.5, "other": 0.5},
            "n_chunks": 1, "long_text": "chunk", "run_id": run, "model_id": "m"}


def test_load_shard_is_idempotent_and_replaces_rows(tmp_path):
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database)
    m1 = _stage(tmp_path, "s1", [_row("a", "x"), _row("b", "y")], ["a", "b"])
    assert db.load_shard(database, m1) == (2, 0)
    # the same shard id again (e.g. a retry after a crash) loads nothing
    m1_again = _stage(tmp_path, "s1", [_row("a", "x"), _row("b", "y")], ["a", "b"])
    assert db.load_shard(database, m1_again) == (0, 0)
    # a later run replaces the rows of the documents it covers, and only those
    m2 = _stage(tmp_path, "s2", [_row("a", "z", "r2")], ["a"], run="r2")
    db.load_shard(database, m2)
    con = duckdb.connect(database, read_only=True)
    rows = con.execute("SELECT doc_id, label, run_id, scores['other'] FROM classifications ORDER BY doc_id").fetchall()
    con.close()
    assert rows == [("a", "z", "r2", 0.5), ("b", "y", "r1", 0.5)]
    assert not list(tmp_path.glob("s*.parquet"))  # loaded packages are cleaned up


def test_failed_load_leaves_no_partial_batch(tmp_path):
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database)
    manifest = _stage(tmp_path, "s1", [_row("a", "x")], ["a"])
    # sabotage: drop the target table's column so the INSERT fails inside the transaction
    con = duckdb.connect(database)
    con.execute("ALTER TABLE classifications DROP COLUMN long_text")
    con.execute("INSERT INTO failed_docs (head, doc_id, error) VALUES ('topic', 'a', 'old failure')")
    con.close()
    with pytest.raises(duckdb.Error):
        db.load_shard(database, manifest)
    con = duckdb.connect(database, read_only=True)
    assert con.execute("SELECT count(*) FROM failed_docs").fetchone() == (1,)  # delete rolled back
    assert con.execute("SELECT count(*) FROM loaded_shards").fetchone() == (0,)
    con.close()
