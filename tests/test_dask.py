"""Scale-out: the same config on a 2-worker local Dask cluster gives the same tables as one process.

Workers infer and stage shards; the flow process is the only DuckDB writer. The comparison covers
every result table, failed_docs and doc_state (all columns but run ids and timestamps).
"""
from __future__ import annotations

import json
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from core.names import quote
from heads.registry import result_tables
from test_dag import ENGLISH, GERMAN


def _snapshot(db) -> dict[str, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for table in [*(t.name for t in result_tables()), "failed_docs", "doc_state"]:
            cols = [c for (c,) in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [table]).fetchall() if c not in ("run_id", "updated_at", "source_file", "load_id")]
            out[table] = sorted(map(repr, con.execute(f"SELECT {', '.join(map(quote, cols))} FROM {table}").fetchall()))
        return out
    finally:
        con.close()


def _workers(db) -> int:
    """Distinct processes that ran units, from the run's per-head stats."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        (stats,) = con.execute("SELECT head_stats FROM runs").fetchone()
    finally:
        con.close()
    return len({w for h in json.loads(stats).values() for w in h["workers"]})


def test_two_dask_workers_match_a_single_process_run(tmp_path, tiny_models, prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from taskheads.cli import main

    rows = [{"id": f"e{i}", "text": t, "lang": "en"} for i, t in enumerate(ENGLISH * 3)]
    rows += [{"id": f"g{i}", "text": t, "lang": "de"} for i, t in enumerate(GERMAN * 2)]
    rows.append({"id": "blank", "text": "   ", "lang": "en"})
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:12]), tmp_path / "corpus" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[12:]), tmp_path / "corpus" / "b.parquet")
    m = tiny_models
    (tmp_path / "p.toml").write_text(f"""
corpus = "corpus"
database = "one.duckdb"
staging = "shared"                # workers and loader meet here (a shared filesystem across machines)
unit_docs = 4
lang_column = "lang"

[heads.topic]
task = "classification"
model = "{m['classification']}"

[heads.ner]
task = "ner"
model = "{m['ner']}"
where = "topic.score > 0"

[heads.english]
task = "translation"
model = "{m['translation']}"
source_lang = "de"
max_new_tokens = 8

[heads.topic_en]
task = "classification"
model = "{m['classification']}"
input = "english"
""")
    # Dask workers are separate processes: they find the session's Prefect API through the environment
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    assert main(["run", str(tmp_path / "p.toml"), "--no-progress"]) == 0
    # a worker dies mid-unit (SIGKILL after inference, before staging): its unit runs again on another worker
    monkeypatch.setenv("TASKHEADS_KILL_AT", "infer:1")
    monkeypatch.setenv("TASKHEADS_KILL_ONCE", str(tmp_path / "worker-killed"))
    assert main(["run", str(tmp_path / "p.toml"), "--db", str(tmp_path / "two.duckdb"), "--runner", "dask",
                 "--workers", "2", "--no-progress"]) == 0
    one, two = _snapshot(tmp_path / "one.duckdb"), _snapshot(tmp_path / "two.duckdb")
    assert one["classifications"] and one["entities"] and one["translations"] and one["failed_docs"]
    assert one == two
    assert (tmp_path / "worker-killed").exists()
    # the killed worker staged nothing; the surviving one and the one the nanny restarted did the rest
    assert _workers(tmp_path / "one.duckdb") == 1 and _workers(tmp_path / "two.duckdb") >= 2
    # packages went through the configured staging folder, one subfolder per database, now empty
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "shared").iterdir()) == ["one.duckdb", "two.duckdb"]
    assert not list((tmp_path / "shared").glob("*/*/*.json"))
    assert not list(tmp_path.glob("*.staging"))
    assert "PREFECT_API_URL" in os.environ  # the CLI left the caller's setting alone
