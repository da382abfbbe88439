"""Replacing a package's documents looks only where their rows are: rows carry the load that wrote them
(`load_id`), the plan reads from `doc_state` which loads hold the documents it sends to inference, and
the loader deletes among those loads' row groups (plus any load of another plan since): O(package),
not O(table). Whatever the order of plans and loads, a document keeps exactly its latest rows."""
from __future__ import annotations

import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heads.registry import result_tables, table
from storage import db
from storage.plan import PlanHead, open_plan
from storage.staging import stage_shard

TABLES = result_tables()


def _row(doc, label, run, model="m"):
    return {"head": "topic", "doc_id": doc, "label": label, "score": 0.5, "scores": {label: 0.5}, "n_chunks": 1,
            "long_text": "chunk", "run_id": run, "model_id": model}


def _stage(folder, shard, labels: dict, run="r1", model="m", **where):
    """A package of `labels` (doc -> label), all done; `where`: replaces / planned_after / plan_id."""
    folder.mkdir(parents=True, exist_ok=True)
    covered = [{"doc_id": k, "fingerprint": "fp-" + k, "status": "done"} for k in labels]
    return stage_shard(folder, shard, "topic", table("classifications"), model,
                       [_row(k, v, run, model) for k, v in labels.items()], [], covered, run, **where)


def _fetch(database, sql: str) -> list[tuple]:
    con = db.connect(database, read_only=True)  # a .duckdb file or a lake
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _labels(database) -> list[tuple]:
    return _fetch(database, "SELECT doc_id, label, load_id FROM classifications ORDER BY ALL")


def _state(database) -> list[tuple]:
    return _fetch(database, "SELECT doc_id, load_id FROM doc_state ORDER BY ALL")


@pytest.fixture
def database(tmp_path):
    path = str(tmp_path / "r.duckdb")
    db.ensure_schema(path, tables=TABLES)
    return path


def test_rows_and_state_carry_the_load_that_wrote_them(tmp_path, database):
    stage = tmp_path / "stage"
    db.load_shard(database, _stage(stage, "a", {"1": "x", "2": "x"}, replaces=[], plan_id="p1"), tables=TABLES)
    db.load_shard(database, _stage(stage, "b", {"3": "y"}, replaces=[], plan_id="p1"), tables=TABLES)
    assert _labels(database) == [("1", "x", 1), ("2", "x", 1), ("3", "y", 2)]
    assert _state(database) == [("1", 1), ("2", 1), ("3", 2)]
    con = duckdb.connect(database, read_only=True)
    assert con.execute("SELECT shard_id, load_id, plan_id FROM loaded_shards ORDER BY 1").fetchall() == \
        [("a", 1, "p1"), ("b", 2, "p1")]
    # the analysts' views do not show storage's bookkeeping
    assert "load_id" not in [d[0] for d in con.execute("SELECT * FROM latest_classifications").description]
    con.close()


def test_a_load_looks_only_in_the_loads_that_hold_its_documents(tmp_path, database):
    stage = tmp_path / "stage"
    for k, docs in enumerate([("1", "2"), ("3", "4"), ("5", "6")]):
        db.load_shard(database, _stage(stage, f"s{k}", {d: "old" for d in docs}, replaces=[], plan_id="p1"),
                      tables=TABLES)
    con = duckdb.connect(database)
    try:
        def where(**manifest):
            return db.replaced_loads(con, "topic", [manifest])

        # new documents: nowhere to look, nothing to delete
        assert where(replaces=[], planned_after=3, plan_id="p2") == ([], False)
        # documents the plan found in loads 1 and 3
        assert where(replaces=[3, 1], planned_after=3, plan_id="p2") == ([1, 3], False)
        # rows from before load ids (NULL): found by `load_id IS NULL`
        assert where(replaces=[None, 2], planned_after=3, plan_id="p2") == ([2], True)
        # a package staged by older code, or planned on a database without load ids: look everywhere
        assert where() is None
        assert where(replaces=None, planned_after=0, plan_id="p2") is None
        # loads of another plan after this plan's last seen load may hold its documents too; its own plan's
        # loads never do (one plan's packages never share a document of a head)
        assert where(replaces=[], planned_after=1, plan_id="p2") == ([2, 3], False)
        assert where(replaces=[], planned_after=1, plan_id="p1") == ([], False)
    finally:
        con.close()


def test_replacing_documents_keeps_only_their_latest_rows_whatever_the_order_of_plans(tmp_path, database):
    """Plans and loads interleaved as held and concurrent runs interleave them: every document ends with
    the rows of the last load that covered it, and one `doc_state` row."""
    stage = tmp_path / "stage"
    load = lambda path: db.load_shard(database, path, tables=TABLES)  # noqa: E731
    load(_stage(stage, "a1", {"1": "a", "2": "a", "3": "a"}, run="ra", replaces=[], plan_id="pa"))
    load(_stage(stage, "a2", {"4": "a"}, run="ra", replaces=[], plan_id="pa"))
    # two runs plan at once after load 2: both see 1 in load 1, and 5 as new
    b = _stage(stage, "b1", {"1": "b", "5": "b"}, run="rb", replaces=[1], planned_after=2, plan_id="pb")
    c = _stage(stage, "c1", {"1": "c", "5": "c", "6": "c"}, run="rc", replaces=[1], planned_after=2, plan_id="pc")
    load(b)
    load(c)  # must find b's rows of 1 and 5 (load 3, another plan's, after its plan)
    # a run planned before any load id existed for 2 and 3 (older rows): a model change re-infers them
    load(_stage(stage, "d1", {"2": "d", "3": "d"}, run="rd", model="m2", replaces=[1], planned_after=4,
                plan_id="pd"))
    # a package of older code (no plan info) replacing 4 and 6
    load(_stage(stage, "e1", {"4": "e", "6": "e"}, run="re"))
    assert [(d, label) for d, label, _ in _labels(database)] == \
        [("1", "c"), ("2", "d"), ("3", "d"), ("4", "e"), ("5", "c"), ("6", "e")]
    assert [d for d, _ in _state(database)] == ["1", "2", "3", "4", "5", "6"]


def test_rows_from_before_load_ids_are_replaced_once(tmp_path, database):
    con = duckdb.connect(database)
    con.execute("INSERT INTO classifications BY NAME SELECT 'topic' AS head, '1' AS doc_id, 'legacy' AS label, "
                "'r0' AS run_id, 'm' AS model_id")
    con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) "
                "VALUES ('topic', '1', 'fp', 'm', 'r0', 'done', now())")
    con.close()
    db.load_shard(database, _stage(tmp_path / "stage", "a", {"1": "new"}, replaces=[None], plan_id="p1"),
                  tables=TABLES)
    assert _labels(database) == [("1", "new", 1)]
    assert _state(database) == [("1", 1)]


def test_queued_packages_that_re_cover_a_document_look_among_their_own_load(tmp_path, database):
    """Several packages loaded as one load, one re-covering a document of an earlier one in the batch
    (another plan, loaded after both were planned): the later rows win, once."""
    stage = tmp_path / "stage"
    db.load_shard(database, _stage(stage, "a", {"1": "a"}, replaces=[], plan_id="p0"), tables=TABLES)
    queue = tmp_path / "r.duckdb.staging"  # the database's staging folder, a folder per run
    _stage(queue / "rb", "b", {"1": "b", "2": "b"}, run="rb", replaces=[1], planned_after=1, plan_id="pb")
    time.sleep(0.01)  # staged in this order (the loader goes by the files' times)
    _stage(queue / "rc", "c", {"1": "c"}, run="rc", replaces=[1], planned_after=1, plan_id="pc")
    got = db.load_staged(database, tables=TABLES)
    assert got.packages == 2
    assert _labels(database) == [("1", "c", 2), ("2", "b", 2)]  # one load
    assert [d for d, _ in _state(database)] == ["1", "2"]


def test_units_carry_the_loads_that_hold_their_documents(tmp_path, database):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["1", "2", "3", "4"], "text": ["one", "two", "three", "four"]}), corpus)
    stage = tmp_path / "stage"
    db.load_shard(database, _stage(stage, "a", {"1": "x"}, replaces=[], plan_id="p0"), tables=TABLES)
    db.load_shard(database, _stage(stage, "b", {"2": "x"}, model="old", replaces=[], plan_id="p0"), tables=TABLES)
    con = duckdb.connect(database)  # 3: a row from before load ids
    con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) "
                "VALUES ('topic', '3', 'fp', 'm', 'r0', 'done', now())")
    con.close()
    # every document's fingerprint differs from its state ('fp-…'): all four are inferred
    with open_plan(database, [str(corpus)], [PlanHead("topic", None, (), "m")], "id", "text", 100) as plan:
        [unit] = list(plan.units("topic"))
    assert unit.planned_after == 2 and unit.plan_id == plan.plan_id
    assert unit.replaces == (None, 1, 2)  # 4 is new; 2's rows are another model's: replaced all the same
    with open_plan(None, [str(corpus)], [PlanHead("topic", None, (), "m")], "id", "text", 100) as plan:
        [unit] = list(plan.units("topic"))
    assert unit.replaces == () and unit.planned_after == 0  # no database yet


# --- a lake: other processes commit while a load runs -------------------------------------------------------
@pytest.fixture
def lake_db(tmp_path):
    path = f"ducklake:sqlite:{tmp_path / 'r.sqlite'}"
    db.ensure_schema(path, tables=TABLES)
    return path


def _snapshot(database) -> int:
    from storage import lake

    con = db.connect(database, read_only=True)
    try:
        return lake.current_snapshot(con)
    finally:
        con.close()


def test_on_a_lake_a_load_also_looks_in_what_committed_after_its_plan_read_the_lake(tmp_path, lake_db, monkeypatch):
    """Two loads committing at once on a lake can take the same load id, or commit out of id order: what a
    load must search beyond its plan's loads is what committed after the plan read the lake (its snapshot),
    not what has a larger id. Without the snapshot (a package of older code), or when it is gone (expired
    by `taskheads compact`), the load searches all of the head's rows."""
    stage = tmp_path / "stage"
    for k, docs in enumerate([("1", "2"), ("3", "4")]):
        db.load_shard(lake_db, _stage(stage, f"s{k}", {d: "old" for d in docs}, replaces=[], plan_id="p1",
                                      planned_snapshot=_snapshot(lake_db)), tables=TABLES)
    planned = _snapshot(lake_db)  # a plan reads the lake here: it has seen loads 1 and 2
    # another run's load commits next, under id 2 (it took its id before load 2 committed)
    with monkeypatch.context() as m:
        m.setattr(db, "_next_load_id", lambda con: 2)
        db.load_shard(lake_db, _stage(stage, "late", {"5": "late"}, replaces=[], plan_id="p9",
                                      planned_snapshot=planned), tables=TABLES)
    con = db.connect(lake_db)
    try:
        def where(**manifest):
            return db.replaced_loads(con, "topic", [manifest], on_lake=True)

        assert where(replaces=[1], planned_after=2, plan_id="p2", planned_snapshot=planned) == ([1, 2], False)
        assert where(replaces=[1], planned_after=2, plan_id="p9", planned_snapshot=planned) == ([1], False)
        assert where(replaces=[], planned_after=2, plan_id="p2", planned_snapshot=_snapshot(lake_db)) == ([], False)
        assert where(replaces=[1], planned_after=2, plan_id="p2") is None  # no snapshot: older code
        assert where(replaces=[1], planned_after=2, plan_id="p2", planned_snapshot=10**9) is None  # expired
    finally:
        con.close()


def test_a_lake_load_deletes_only_among_the_loads_that_can_hold_its_documents(tmp_path, lake_db, monkeypatch):
    """Two runs plan at once; the second's package commits under an id the first's plan had already seen
    (load 2): the first's package still replaces it, and neither searched the whole head."""
    stage = tmp_path / "stage"
    load = lambda path: db.load_shard(lake_db, path, tables=TABLES)  # noqa: E731
    load(_stage(stage, "a", {"1": "a"}, run="ra", replaces=[], plan_id="pa", planned_snapshot=_snapshot(lake_db)))
    load(_stage(stage, "b", {"2": "b"}, run="rb", replaces=[], plan_id="pb", planned_snapshot=_snapshot(lake_db)))
    planned = _snapshot(lake_db)
    p = _stage(stage, "p", {"1": "p", "3": "p"}, run="rp", replaces=[1], planned_after=2, plan_id="pp",
               planned_snapshot=planned)
    q = _stage(stage, "q", {"1": "q"}, run="rq", replaces=[1], planned_after=2, plan_id="pq", planned_snapshot=planned)
    searched = []
    real_delete = db._delete_done_docs
    monkeypatch.setattr(db, "_delete_done_docs", lambda con, target, head, replaced: (
        searched.append((target, replaced)), real_delete(con, target, head, replaced))[1])
    with monkeypatch.context() as m:
        m.setattr(db, "_next_load_id", lambda con: 2)
        load(q)
    load(p)
    assert searched == [("classifications", ([1], False)), ("doc_state", ([1], False)),
                        ("classifications", ([1, 2], False)), ("doc_state", ([1, 2], False))]
    assert _fetch(lake_db, "SELECT doc_id, label FROM classifications ORDER BY ALL") == \
        [("1", "p"), ("2", "b"), ("3", "p")]
    assert _fetch(lake_db, "SELECT doc_id, count(*) FROM doc_state GROUP BY ALL ORDER BY ALL") == \
        [("1", 1), ("2", 1), ("3", 1)]


def test_units_planned_on_a_lake_carry_the_snapshot_the_plan_read(tmp_path, lake_db):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["one", "two"]}), corpus)
    db.load_shard(lake_db, _stage(tmp_path / "stage", "a", {"1": "x"}, replaces=[], plan_id="p0",
                                  planned_snapshot=_snapshot(lake_db)), tables=TABLES)
    planned = _snapshot(lake_db)
    with open_plan(lake_db, [str(corpus)], [PlanHead("topic", None, (), "m")], "id", "text", 100) as plan:
        [unit] = list(plan.units("topic"))
    assert (unit.replaces, unit.planned_after, unit.planned_snapshot) == ((1,), 1, planned)
    manifest = _stage(tmp_path / "stage", "b", {"1": "y"}, replaces=unit.replaces, planned_after=1, plan_id="p1",
                      planned_snapshot=unit.planned_snapshot)
    from storage.staging import read_manifest

    assert read_manifest(manifest, TABLES)[0]["planned_snapshot"] == planned
    with open_plan(str(tmp_path / "r.duckdb"), [str(corpus)], [PlanHead("topic", None, (), "m")], "id", "text",
                   100) as plan:
        [unit] = list(plan.units("topic"))
    assert unit.planned_snapshot is None  # a .duckdb file: one writer at a time, load ids are in commit order
