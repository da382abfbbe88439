"""Corpus reading, routing, staging and the transactional loader."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import db
from storage.corpus import CorpusError, check_files, corpus_files, read_docs
from storage.plan import PlanHead, plan_work
from storage.staging import stage_shard
from heads.registry import result_tables, table

TABLES = result_tables()  # every registered head's result table


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


def test_fingerprints_are_sha256_prefixes_and_earlier_full_ones_still_count_as_unchanged(tmp_path):
    """The planner keeps fingerprints narrow (the first 128 bits of sha256, stored as 32 hex digits) and
    hashes a text once for every head reading it; a database written with the earlier 64-digit ones
    reruns with nothing to do, and a changed text or a value that is not hex is still work."""
    import hashlib

    path = tmp_path / "a.parquet"
    texts = ["alpha", "beta", "gamma", "delta"]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": texts, "q": ["x", "y", "z", "w"]}), path)
    heads = [PlanHead("a", None, (), "m1"), PlanHead("b", None, (), "m1"), PlanHead("c", None, ("q",), "m1")]
    plans, _, _ = plan_work(None, [str(path)], heads, "id", "text", unit_docs=10)
    full = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert plans["a"].units[0].fingerprints == plans["b"].units[0].fingerprints == tuple(f[:32] for f in full)
    with_q = [hashlib.sha256(f"{t}\0{q}".encode()).hexdigest()[:32] for t, q in zip(texts, "xyzw")]
    assert plans["c"].units[0].fingerprints == tuple(with_q)

    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    stored = {"a": full, "b": [f[:32] for f in full], "c": [hashlib.sha256(b"other").hexdigest(), "not hex at all",
                                                          with_q[2], with_q[3]]}
    with duckdb.connect(database) as con:
        for head, fps in stored.items():
            for doc_id, fp in zip("1234", fps):
                con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) VALUES (?, ?, ?, 'm1', 'r0', 'done', now())", [head, doc_id, fp])
    plans, _, _ = plan_work(database, [str(path)], heads, "id", "text", unit_docs=10)
    assert [(plans[h].unchanged, plans[h].to_infer) for h in "abc"] == [(4, 0), (4, 0), (2, 2)]
    assert plans["c"].units[0].rows == (0, 1)


def test_check_files_names_bad_files_and_read_docs_reads_exact_rows(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "text": [f"t{i}" for i in range(10)]}), good, row_group_size=3)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:-20])  # truncated footer
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"id": [1]}), nocol)
    usable, errors = check_files([str(good), str(broken), str(nocol)], ["id", "text"])
    assert usable == [str(good)] and len(errors) == 2
    assert errors[0].startswith(f"{broken}: not a readable Parquet file")
    assert errors[1].startswith(f"{nocol}: missing column 'text'")
    # rows spread over row groups, in the order asked
    docs, invalid = read_docs(str(good), [7, 2, 3, 9], "id", "text", [])
    assert [(row, d.doc_id, d.text) for row, d in docs] == [(7, "7", "t7"), (2, "2", "t2"), (3, "3", "t3"),
                                                              (9, "9", "t9")]
    assert invalid == []


def test_read_docs_reports_invalid_rows(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({
        "id": [1, 2, None, 4, 5, 6],
        "text": ["good one", "  \t ", "no id", None, "", "second good"],
        "question": ["q1", None, None, None, None, "q6"],
    }), path)
    docs, invalid = read_docs(str(path), list(range(6)), "id", "text", ["question"])
    assert [d.doc_id for _, d in docs] == ["1", "6"] and docs[0][1].fields == {"question": "q1"}
    assert {(i["row"], i["doc_id"], i["error"]) for i in invalid} == {
        (1, "2", "whitespace-only text"), (2, None, "null id (row 2 of c.parquet)"), (3, "4", "null text"),
        (4, "5", "empty text")}


def test_ids_read_as_text_the_way_the_planner_makes_them():
    """A unit's documents get their ids as text in Python (integers without DuckDB: one instance per unit was
    14 ms and ~14MB); the text must be what the planner's SQL makes of the same value, whatever its type."""
    from datetime import date, datetime
    from decimal import Decimal

    from storage.corpus import doc_ids, id_text

    values = [pa.array([0, 1, -1, 127, -128, None], pa.int8()), pa.array([2**15 - 1, -2**15], pa.int16()),
              pa.array([2**31 - 1, -2**31, 42], pa.int32()), pa.array([2**63 - 1, -2**63, 10**12], pa.int64()),
              pa.array([255, 0], pa.uint8()), pa.array([2**32 - 1], pa.uint32()), pa.array([2**64 - 1, 7], pa.uint64()),
              pa.array([1.0, 2.5, None], pa.float64()), pa.array([Decimal("1.50")], pa.decimal128(5, 2)),
              pa.array([date(2024, 2, 29)]), pa.array([datetime(2024, 1, 2, 3, 4, 5)], pa.timestamp("us")),
              pa.array([True, False]), pa.array(["a", None, "7"]), pa.chunked_array([[1, 2], [3]], pa.int64())]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for v in values:
        con.register("v", pa.table({"id": v}))
        expected = [r[0] for r in con.execute(f"SELECT {id_text('id')} FROM v").fetchall()]
        assert doc_ids(v) == expected, v.type
    con.close()


def test_read_docs_non_string_text_column(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": [10, 20]}), path)
    docs, invalid = read_docs(str(path), [0, 1], "id", "text", [])
    assert docs == [] and [i["error"] for i in invalid] == ["text is not a string (int)"] * 2


def test_plan_routes_finds_duplicates_and_skips_unchanged(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["x", "y", "z"], "lang": ["en", "de", "en"]}), a)
    pq.write_table(pa.table({"id": [2, 3, 4], "text": ["y", "CHANGED", "w"], "lang": ["de", "en", "en"]}), b)
    heads = [PlanHead("all", None, (), "m1"), PlanHead("en", "lang = 'en'", (), "m1")]
    plans, scanned, errors = plan_work(None, [str(a), str(b)], heads, "id", "text", unit_docs=2)
    assert scanned == 6 and errors == []
    p = plans["all"]
    assert (p.routed, p.duplicates, p.conflicts, p.to_infer) == (6, 1, 1, 4)
    assert [(u.path, u.rows) for u in p.units] == [(str(a), (0, 1)), (str(a), (2,)), (str(b), (2,))]
    (refused,) = [u.refused for u in p.units if u.refused]
    assert refused == ((1, "3", "duplicate id with different text (first seen in a.parquet row 2)"),)
    en = plans["en"]
    assert (en.routed, en.to_infer, en.conflicts) == (4, 3, 1)

    # with state saying docs 1 and 2 are done with model m1, they are skipped; m2 would redo them
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    fp = dict(zip([0, 1], p.units[0].fingerprints))
    con = duckdb.connect(database)
    con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) VALUES ('all', '1', ?, 'm1', 'r0', 'done', now()), "
                "('all', '2', ?, 'm1', 'r0', 'done', now())", [fp[0], fp[1]])
    con.close()
    plans, _, _ = plan_work(database, [str(a), str(b)], heads, "id", "text", unit_docs=10)
    p = plans["all"]  # every routed row counted once, whichever way it went
    assert (p.routed, p.duplicates, p.conflicts, p.unchanged, p.to_infer) == (6, 1, 1, 2, 2)
    assert (plans["en"].routed, plans["en"].unchanged, plans["en"].to_infer) == (4, 0, 3)  # no state for "en"
    plans, _, _ = plan_work(database, [str(a), str(b)], heads, "id", "text", unit_docs=10, full=True)
    p = plans["all"]
    assert (p.routed, p.duplicates, p.conflicts, p.unchanged, p.to_infer) == (6, 1, 1, 0, 4)
    other = [PlanHead("all", None, (), "m2")]
    plans, _, _ = plan_work(database, [str(a), str(b)], other, "id", "text", unit_docs=10)
    assert plans["all"].unchanged == 0


def _stage(tmp_path, shard, rows, covered, run="r1"):
    cov = [{"doc_id": d, "fingerprint": "fp-" + d, "status": "done"} for d in covered]
    return stage_shard(tmp_path, shard, "topic", table("classifications"), "m", rows, [], cov, run)


def _row(doc, label, run="r1"):
    return {"head": "topic", "doc_id": doc, "label": label, "score": 0.5, "scores": {label: 0.5, "other": 0.5},
            "n_chunks": 1, "long_text": "chunk", "run_id": run, "model_id": "m"}


def test_load_shard_is_idempotent_and_replaces_rows(tmp_path):
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    m1 = _stage(tmp_path, "s1", [_row("a", "x"), _row("b", "y")], ["a", "b"])
    assert db.load_shard(database, m1, tables=TABLES) == (2, 0)
    # the same shard id again (e.g. a retry after a crash) loads nothing
    m1_again = _stage(tmp_path, "s1", [_row("a", "x"), _row("b", "y")], ["a", "b"])
    assert db.load_shard(database, m1_again, tables=TABLES) == (0, 0)
    # a later run replaces the rows of the documents it covers, and only those
    m2 = _stage(tmp_path, "s2", [_row("a", "z", "r2")], ["a"], run="r2")
    db.load_shard(database, m2, tables=TABLES)
    con = duckdb.connect(database, read_only=True)
    rows = con.execute("SELECT doc_id, label, run_id, scores['other'] FROM classifications ORDER BY doc_id").fetchall()
    con.close()
    assert rows == [("a", "z", "r2", 0.5), ("b", "y", "r1", 0.5)]
    con = duckdb.connect(database, read_only=True)
    state = con.execute("SELECT doc_id, run_id, status FROM doc_state ORDER BY doc_id").fetchall()
    con.close()
    assert state == [("a", "r2", "done"), ("b", "r1", "done")]
    assert not list(tmp_path.glob("s*.parquet"))  # loaded packages are cleaned up


def test_failed_load_leaves_no_partial_batch(tmp_path):
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=TABLES)
    manifest = _stage(tmp_path, "s1", [_row("a", "x")], ["a"])
    # sabotage: drop the target table's column so the INSERT fails inside the transaction
    con = duckdb.connect(database)
    con.execute("ALTER TABLE classifications DROP COLUMN long_text")
    con.execute("INSERT INTO failed_docs (head, doc_id, error) VALUES ('topic', 'a', 'old failure')")
    con.close()
    with pytest.raises(duckdb.Error):
        db.load_shard(database, manifest, tables=TABLES)
    con = duckdb.connect(database, read_only=True)
    assert con.execute("SELECT count(*) FROM failed_docs").fetchone() == (1,)  # delete rolled back
    assert con.execute("SELECT count(*) FROM loaded_shards").fetchone() == (0,)
    con.close()


def test_configured_staging_keeps_databases_apart(tmp_path):
    from storage.staging import staging_root

    a, b = tmp_path / "x" / "results.duckdb", tmp_path / "y" / "results.duckdb"
    db.ensure_schema(str(a), tables=TABLES)
    db.ensure_schema(str(b), tables=TABLES)
    assert staging_root(str(a)) == tmp_path / "x" / "results.duckdb.staging"
    shared = str(tmp_path / "shared")
    ra, rb = staging_root(str(a), shared), staging_root(str(b), shared)
    assert ra.parent == rb.parent == tmp_path / "shared" and ra != rb  # same file name, other database
    assert staging_root(str(a), shared) == ra  # stable: a rerun finds a killed run's packages
