"""Streaming plans (issue 16 item 1): units are read from the plan as the window frees up, so the
flow never holds more than `max_units_in_flight` (default 2 per worker) work units at once, and
units run while the plan still has more to give.

Reference: the WorkUnit objects alive in the process (the garbage collector's own count), taken
each time a unit starts inference and each time a package loads.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.db
import tasks.inference
from storage.plan import WorkUnit


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKHEADS_CACHE_DIR", str(tmp_path / "hash-cache"))


def _alive_units() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is WorkUnit)


@pytest.fixture
def watched(monkeypatch):
    """Units alive at each inference start and each load; units started in order."""
    seen = {"at_start": [], "at_load": [], "started": 0}
    infer, load = tasks.inference._infer, storage.db.load_staged

    def counted_infer(*args, **kwargs):
        seen["at_start"].append(_alive_units())
        seen["started"] += 1
        return infer(*args, **kwargs)

    def counted_load(*args, **kwargs):
        seen["at_load"].append(_alive_units())
        return load(*args, **kwargs)

    monkeypatch.setattr(tasks.inference, "_infer", counted_infer)
    monkeypatch.setattr(storage.db, "load_staged", counted_load)
    return seen


def _corpus(tmp_path, n: int) -> None:
    (tmp_path / "corpus").mkdir()
    rows = [{"id": i, "text": f"document {i} on the budget", "lang": "en"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows[: n // 2]), tmp_path / "corpus" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[n // 2:]), tmp_path / "corpus" / "b.parquet")


def _one_document_units(tmp_path, tiny_models, extra: str):
    """A 60-document corpus and a config giving the tiny classifier one unit per document."""
    _corpus(tmp_path, 60)
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 1
{extra}

[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
""")
    return cfg


@pytest.mark.parametrize("window_key, window", [("", 8), ("max_units_in_flight = 1", 1)])
def test_units_stream_through_a_bounded_window(tmp_path, tiny_models, prefect_harness, watched, window_key, window):
    from flows.process_corpus import process_corpus

    cfg = _one_document_units(tmp_path, tiny_models, window_key)
    gc.collect()
    before = _alive_units()
    summary = process_corpus(config_path=str(cfg))
    assert summary["heads"]["topic"]["inferred"] == 60 and summary["heads"]["topic"]["done"] == 60
    assert watched["started"] == 60 and len(watched["at_load"]) >= 60  # the loader runs as each unit finishes
    # the default window is 2 per worker (the flow's thread pool has 4). Besides the units in flight, a
    # finished unit lingers until Prefect drops its task run, and one is being submitted: O(window)
    most = max(watched["at_start"] + watched["at_load"]) - before
    assert most <= 2 * window + 2, (most, window)
    assert most < 60 / 3  # never the whole plan at once


def test_a_staged_input_unit_names_the_corpus_rows_of_its_positions():
    """Units of a head reading a translation point at positions in the staged input file (the second
    unit's start past the first's length); reports name the corpus row each position came from."""
    unit = WorkUnit(path="inputs/fr-abc.parquet", rows=(2000, 2001, 2002), fingerprints=("a", "b", "c"),
                    source="news.parquet", source_rows=(4005, 4007, 4100))
    assert [unit.source_row(r) for r in unit.rows] == [4005, 4007, 4100]
    assert unit.unit_id == "news.parquet:4005+3"


def test_a_planner_out_of_memory_is_loud_not_a_bad_file(tmp_path):
    """Running out of the planner's DuckDB memory is not the corpus file's fault: it must raise (and fail
    the run), not come back as a file error that skips the file and writes nothing for it."""
    from storage.plan import PlanHead, open_plan

    path = tmp_path / "docs.parquet"
    n = 200_000
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(n)],
                             "text": [f"story {i} " + "word " * (i % 50) for i in range(n)]}), path)
    heads = [PlanHead("a", None, (), "m-a"), PlanHead("b", None, (), "m-b")]
    with pytest.raises(duckdb.OutOfMemoryException):
        with open_plan(None, [str(path)], heads, "id", "text", 1000, memory_limit="8MB",
                       temp_directory=str(tmp_path / "spill")) as plan:
            assert not plan.errors, plan.errors  # main: the file comes back as "cannot be planned"
    with open_plan(None, [str(path)], heads, "id", "text", 1000, memory_limit="1GB") as plan:
        assert plan.errors == [] and plan.heads["a"].to_infer == n


def test_a_plan_that_runs_out_of_memory_after_the_scan_names_the_head_and_the_remedy(tmp_path):
    """At a `memory_limit` the scan fits in but a head's classification (its joins and windows over every
    scanned row) does not, the error says which head, the limit and what to do, as the scan's does, not
    DuckDB's own advice to set threads or insertion order, which a config cannot reach."""
    from storage.plan import PlanHead, open_plan

    path = tmp_path / "docs.parquet"
    n = 100_000
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(n)],
                             "text": [f"story {i} " + "word " * (i % 50) for i in range(n)]}), path)
    with pytest.raises(duckdb.OutOfMemoryException) as raised:
        with open_plan(None, [str(path)], [PlanHead("topic", None, (), "m-topic")], "id", "text", 1000,
                       memory_limit="12MB", temp_directory=str(tmp_path / "spill")):
            pass
    message = str(raised.value)
    assert message.startswith("planning ran out of memory on head topic (memory_limit 12MB, 100,000 rows "
                              "scanned): raise the config's memory_limit"), message
    assert "SET threads" not in message


def test_a_plan_made_in_passes_is_the_plan_made_in_one(tmp_path, monkeypatch):
    """Classifying in passes over hash partitions of the ids (what a small memory_limit needs at millions of
    rows) gives the same counts and units as one statement: repeats, conflicts, id-less rows, unchanged,
    changed and other-model state, held and retried failures alike."""
    from dataclasses import replace

    import storage.plan as plan
    from heads.registry import result_tables
    from storage import db
    from storage.plan import PlanHead

    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    ids = [[None if i % 97 == 0 else f"d{i % 700}" for i in range(1000)], [f"d{i}" for i in range(500, 1500)]]
    for path, id_list, salt in zip(files, ids, ("", "x")):
        texts = [f"text {d} {salt if i % 3 == 0 else ''}" for i, d in enumerate(id_list)]
        pq.write_table(pa.table({"id": id_list, "text": texts, "lang": ["en", "de"] * 500}), path)
    heads = [PlanHead("all", None, (), "m1"), PlanHead("en", "lang = 'en'", (), "m1")]
    first, _, _ = plan.plan_work(None, [str(f) for f in files], heads, "id", "text", unit_docs=50)
    database = str(tmp_path / "r.duckdb")
    db.ensure_schema(database, tables=result_tables())
    id_of = {str(f): pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in files}
    done = [(id_of[u.path][r], fp) for u in first["all"].units for r, fp in zip(u.rows, u.fingerprints)]
    with duckdb.connect(database) as con:
        for k, (doc, fp) in enumerate(done):
            if doc is None or k % 5 == 4:
                continue  # not done yet
            model, fingerprint = ("m2" if k % 7 == 0 else "m1"), (fp if k % 4 else "0" * 32)  # another model; changed
            con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) "
                        "VALUES ('all', ?, ?, ?, 'r0', 'done', now())", [doc, fingerprint, model])
            if k % 4 == 0:  # failed since: transient (retried or, at 3 attempts, held) or terminal (held)
                con.execute("INSERT INTO failed_docs (head, doc_id, fingerprint, model_id, run_id, stage, kind, "
                            "attempts, error) VALUES ('all', ?, ?, 'm1', 'r0', 'infer', ?, ?, 'x')",
                            [doc, fp, "terminal" if k % 3 == 0 else "transient", 1 + k % 3])

    def planned(passes: int):
        monkeypatch.setattr(plan, "_passes", lambda con, rows: passes)
        plans, _, _ = plan.plan_work(database, [str(f) for f in files], heads, "id", "text", unit_docs=50)
        return {name: (replace(p, units=[]), [(u.path, u.rows, u.fingerprints, u.refused, u.replaces) for u in p.units])
                for name, p in plans.items()}

    once = planned(1)
    counts = once["all"][0]
    assert counts.duplicates and counts.conflicts and counts.unchanged and counts.retried and counts.skipped_failed
    assert planned(7) == once


def _planned_in(tmp_path, tiny_models, memory_limit: str):
    """A 200,000-row corpus (more than 8MB of planner memory) and a config with `memory_limit`: (config file,
    its body without the limit, rows)."""
    (tmp_path / "corpus").mkdir()
    n = 200_000
    pq.write_table(pa.table({"id": list(range(n)), "text": [f"story {i} " + "word " * (i % 50) for i in range(n)]}),
                   tmp_path / "corpus" / "a.parquet")
    cfg = tmp_path / "pipeline.toml"
    body = f'corpus = "{tmp_path / "corpus"}"\ndatabase = "{tmp_path / "results.duckdb"}"\n' \
           f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
    cfg.write_text(f'memory_limit = "{memory_limit}"\n' + body)
    return cfg, body, n


def test_a_run_whose_plan_runs_out_of_memory_fails_loudly_and_writes_no_file_error(tmp_path, tiny_models,
                                                                                   prefect_harness, capsys):
    """`memory_limit` reaches the planner; exhausting it is the machine's fault, not the file's: exit 1,
    the traceback names it, and no file is reported bad nor any document failed."""
    from taskheads.cli import main

    cfg, _, _ = _planned_in(tmp_path, tiny_models, "8MB")
    assert main(["run", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "planning ran out of memory at a.parquet (memory_limit 8MB): raise the config's memory_limit" in err
    assert "cannot be planned" not in err
    with duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM failed_docs").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM classifications").fetchone() == (0,)


@pytest.mark.parametrize("memory_limit, threads", [("96MB", 1), ("200MB", 2), ("8GB", None)])
def test_the_planner_scans_with_as_many_threads_as_its_memory_holds(tmp_path, monkeypatch, memory_limit, threads):
    """Each scanning thread holds a row group of text: at a small `memory_limit` two threads run out of memory
    where one plans (measured: 122,880-row groups of news text at 128MB), so the planner scans with one thread
    per 96MB, never more than the machine's; and it hands freed memory back at once (DuckDB's allocator keeps
    up to 128MB otherwise), so its peak follows the limit."""
    import storage.plan
    from storage.plan import PlanHead, open_plan

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), path)
    settings = []

    def connect(*args, **kwargs):  # the planning connection, as it scans (it closes once the plan is made)
        con = sandboxed_connection(*args, **kwargs)
        settings.append(con.execute("SELECT current_setting('threads'), current_setting('allocator_flush_threshold')"
                                    ).fetchone())
        return con

    sandboxed_connection = storage.plan.sandboxed_connection
    monkeypatch.setattr(storage.plan, "sandboxed_connection", connect)
    with open_plan(None, [str(path)], [PlanHead("a", None, (), "m-a")], "id", "text", 1000, memory_limit=memory_limit,
                   temp_directory=str(tmp_path / "spill")):
        [(got, flush)] = settings
    with duckdb.connect() as default:
        machine = default.execute("SELECT current_setting('threads')").fetchone()[0]
    assert got == min(threads or machine, machine)
    assert flush == "16.0 MiB"


def test_a_run_keeps_arrow_on_the_system_allocator(tmp_path, tiny_models, prefect_harness):
    """pyarrow's default allocator (mimalloc) keeps the heaps of the threads units stage on: a run's process grew
    with every unit (about 170MB over a 1M-document run). The run's process uses the system allocator."""
    from flows.process_corpus import process_corpus

    _corpus(tmp_path, 40)
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'corpus = "{tmp_path / "corpus"}"\ndatabase = "{tmp_path / "results.duckdb"}"\nunit_docs = 10\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n')
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    try:
        assert process_corpus(config_path=str(cfg))["status"] == "completed"
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(pa.mimalloc_memory_pool())


@pytest.mark.parametrize("entry", ["taskheads.cli", "flows.process_corpus", "tasks.inference"])
def test_arrow_allocates_from_the_system_allocator_in_every_process_a_run_uses(entry):
    """`pyarrow.set_memory_pool` reaches only what Python asks of Arrow; Parquet reads and kernels take the
    allocator libarrow picks as it loads: mimalloc, whose 1 GiB reserve held 75-95MB more resident by the end
    of a 1M-document run. The CLI, the flow (Prefect deployments) and the tasks (Dask workers) choose the
    system allocator before pyarrow loads, unless the user's environment chose one."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    code = f"import {entry}, pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split()[-1] == "system"
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split()[-1] == "jemalloc"


def test_plan_only_plans_within_memory_limit_too(tmp_path, tiny_models, capsys):
    """`--plan-only` plans the same corpus as the run, so the config's memory_limit bounds it too (and it spills
    to a folder of its own, removed after: it writes nothing)."""
    from taskheads.cli import main

    cfg, body, n = _planned_in(tmp_path, tiny_models, "8MB")
    assert main(["run", str(cfg), "--plan-only"]) == 1
    assert "planning ran out of memory at a.parquet (memory_limit 8MB)" in capsys.readouterr().err
    cfg.write_text('memory_limit = "256MB"\n' + body)
    assert main(["run", str(cfg), "--plan-only"]) == 0
    assert f"topic: routed {n}, unchanged 0, to infer {n}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "hash-cache", "pipeline.toml"]  # the fixture's


def _arrow_peak(body: str, *args: str) -> int:
    """The most Arrow memory a fresh process held running `body` (with `read_rows` imported, `args` as
    sys.argv[1:]), through a proxy of the system pool."""
    code = ("import json, os, sys, pyarrow as pa\n"
            "pool = pa.proxy_memory_pool(pa.system_memory_pool()); pa.set_memory_pool(pool)\n"
            "from storage.corpus import read_rows\n" + body +
            "print(pool.max_memory(), flush=True); os._exit(0)")  # a proxy pool's buffers must not outlive it
    return int(subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              check=True).stdout)


def test_a_unit_reads_its_rows_without_decoding_their_whole_row_group(tmp_path):
    """A unit of a few thousand rows sits in a Parquet row group of up to ~123k (DuckDB's and many writers'
    size): decoding the whole group to take the unit's rows held tens of MB per unit in flight. The rows
    come back as the group would give them, in the order asked, for about a batch's memory."""
    from storage.corpus import read_rows

    n = 60_000
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": [f"document {i} " + "word " * 40 for i in range(n)]}),
                   path, row_group_size=n)
    rows = [30_500, 30_001, 30_002] + list(range(31_000, 33_000)) + [30_001]  # out of order, one twice
    assert read_rows(str(path), rows, ["id", "text"]).equals(pq.read_table(path).take(rows))
    peak = _arrow_peak("got = read_rows(sys.argv[1], json.loads(sys.argv[2]), ['id', 'text'])\n",
                       str(path), json.dumps(rows))
    group_text = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    assert peak < group_text / 2, (peak, group_text)  # 4.9MB; decoding the whole group: 18.8MB


def test_units_of_a_process_decode_the_corpus_one_at_a_time(tmp_path):
    """DuckDB's `COPY ... TO 'x.parquet'` writes a row group's text column as one page, and a page is decoded
    whole: every unit reading such a file at once held its own copy of the page (~20MB for 122,880 news-like
    rows). Units of one process (threads of a run or of a Dask worker) now read one at a time: four reading
    at once need about what one needs."""
    path = tmp_path / "duckdb-written.parquet"
    duckdb.sql(f"COPY (SELECT i AS id, 'story ' || i || ' ' || repeat('market talks said year ', 6) AS text "
               f"FROM range(60000) t(i)) TO '{path}'")
    measure = ("import threading\n"
               "readers = int(sys.argv[2]); start = threading.Barrier(readers); got = []\n"
               "def unit(k):\n"
               "    start.wait()\n"
               "    for j in range(8):  # units of a process, one after another on each thread\n"
               "        at = (k * 8 + j) * 1500\n"
               "        unit_rows = read_rows(sys.argv[1], list(range(at, at + 1500)), ['id', 'text'])\n"
               "        got.append(unit_rows.column('id')[0].as_py())  # not the rows: one page is measured\n"
               "threads = [threading.Thread(target=unit, args=(k,)) for k in range(readers)]\n"
               "[t.start() for t in threads]; [t.join() for t in threads]\n"
               "assert sorted(got) == [u * 1500 for u in range(readers * 8)]\n")
    one = _arrow_peak(measure, str(path), "1")
    assert one > pq.ParquetFile(path).metadata.row_group(0).column(1).total_uncompressed_size / 2  # one page
    four = _arrow_peak(measure, str(path), "4")
    assert four < 1.5 * one, (four, one)  # each its own page: ~4x


def test_a_plan_hands_its_duckdb_memory_back_before_any_unit_runs(tmp_path):
    """The plan's work tables filled the planning connection's buffer pool (up to `memory_limit`) for the whole
    run, as units were read back a chunk at a time: a 1M-document run held ~50MB more than a 100k one, a 10M
    run ~75MB. Once planned, the unread units live in a file beside the spill folder, one row group per chunk read,
    the planning connection is closed, and the file goes when the plan closes."""
    from storage.plan import PlanHead, open_plan

    path = tmp_path / "docs.parquet"
    n = 5_000
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(n)], "text": [f"story {i}" for i in range(n)]}), path)
    spill = tmp_path / "spill"
    heads = [PlanHead("a", None, (), "m-a"), PlanHead("b", "id < 'doc-2'", (), "m-b")]
    with open_plan(None, [str(path)], heads, "id", "text", 100, memory_limit="96MB", temp_directory=str(spill)) as plan:
        files = sorted(tmp_path.glob("plan-units-*/*.parquet"))
        assert len(files) == 2, files  # one per head with units
        assert sorted(pq.ParquetFile(f).metadata.num_row_groups for f in files) == [
            -(-plan.heads["b"].n_units // 16), -(-plan.heads["a"].n_units // 16)]
        with pytest.raises(duckdb.ConnectionException):
            plan.con.execute("SELECT 1")  # closed: its buffer pool is given back
        units = {h.name: list(plan.units(h.name)) for h in heads}
    assert not list(tmp_path.glob("plan-units-*"))
    assert [len(u.rows) for u in units["a"]] == [100] * 50
    assert sorted(d for u in units["a"] for d in u.rows) == list(range(n))
    assert sum(len(u.rows) for u in units["b"]) == plan.heads["b"].to_infer == sum(
        1 for i in range(n) if f"doc-{i}" < "doc-2")
    assert all(len(fp) == 32 for u in units["a"] for fp in u.fingerprints)


def test_prefect_links_of_finished_units_do_not_pile_up_over_a_run(tmp_path, tiny_models, prefect_harness,
                                                                   monkeypatch):
    """Prefect links every task's result (and each of its fields) to a copy of the task's state in the flow
    run's context, for dependency tracking, and keeps the links for the whole flow run: over a 10M-document
    run (5,000 units) that grew the flow's memory with every unit. As each unit finishes, the flow drops the
    links of every task finished so far (units and loads)."""
    from prefect.context import FlowRunContext

    from flows.process_corpus import process_corpus

    links = []
    load = storage.db.load_staged

    def counted_load(*args, **kwargs):
        context = FlowRunContext.get()
        if context is not None:
            links.append(len(context.run_results))
        return load(*args, **kwargs)

    monkeypatch.setattr(storage.db, "load_staged", counted_load)
    cfg = _one_document_units(tmp_path, tiny_models, "max_units_in_flight = 2")
    summary = process_corpus(config_path=str(cfg))
    assert summary["heads"]["topic"]["done"] == 60 and len(links) >= 60
    # what the units in flight (2), the one just finished and the last load made (~13 at most here),
    # whatever the number of units: kept, the 60 units' links reached ~370
    assert max(links) <= 30, links
