"""A rerun with nothing to do loads no model (issue 16 item 3), and a database written with the
version-1 model identity is not re-inferred after the identity formula changed.

References: load_head counted where it is called (heads.loading), the version-1 formula copied
verbatim in test_identity (it needs a loaded head), and the stored rows themselves.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import heads.loading as loading
from heads.loading import RESIDENT, load_head
from pipeline.config import load_config
from test_identity import v1_model_identity


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKHEADS_CACHE_DIR", str(tmp_path / "hash-cache"))


@pytest.fixture
def counted_loads(monkeypatch):
    """Every model load of this process, by head name; the per-process cache starts empty."""
    calls: list[str] = []
    real = loading.load_head

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    RESIDENT.heads.clear()
    monkeypatch.setattr(loading, "load_head", counting)
    yield calls
    RESIDENT.heads.clear()


def _setup(tmp_path, tiny_models) -> str:
    (tmp_path / "corpus").mkdir()
    rows = [{"id": i, "text": f"document number {i} about the budget", "lang": "de" if i % 3 == 0 else "en"}
            for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "a.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 8

[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"

[heads.lang]
task = "language"
languages = ["en", "de"]
""")
    return str(cfg)


def _fetch(db: str, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(db, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def test_noop_rerun_loads_no_model_and_a_first_run_loads_each_once(tmp_path, tiny_models, prefect_harness,
                                                                     counted_loads):
    from flows.process_corpus import process_corpus

    cfg = _setup(tmp_path, tiny_models)
    first = process_corpus(config_path=cfg)
    assert first["heads"]["topic"]["inferred"] == 20 and first["heads"]["lang"]["inferred"] == 20
    assert sorted(counted_loads) == ["lang", "topic"]  # once per process: the flow's units share it
    RESIDENT.heads.clear()
    counted_loads.clear()
    again = process_corpus(config_path=cfg)
    assert again["heads"]["topic"]["inferred"] == 0 and again["heads"]["topic"]["unchanged"] == 20
    assert again["heads"]["lang"]["inferred"] == 0 and again["heads"]["lang"]["unchanged"] == 20
    assert counted_loads == []
    # the model ids recorded are the ones computed from the files, loaded or not
    ids = dict(_fetch(str(tmp_path / "results.duckdb"), "SELECT head, model_id FROM models"))
    assert ids["topic"] == first["heads"]["topic"]["model_id"] == again["heads"]["topic"]["model_id"]


def test_database_of_the_version_1_identity_is_not_re_inferred(tmp_path, tiny_models, prefect_harness):
    from flows.process_corpus import process_corpus

    cfg_path = _setup(tmp_path, tiny_models)
    db = str(tmp_path / "results.duckdb")
    first = process_corpus(config_path=cfg_path)
    cfg = load_config(cfg_path)
    # make the database as the code before identity version 2 wrote it: every row under the v1 id
    tables = {"topic": "classifications", "lang": "languages"}
    old_ids = {}
    con = duckdb.connect(db)
    try:
        for h in cfg.heads:
            head = load_head(h.name, h.task, h.model, params=h.params, device="cpu")
            old = v1_model_identity(h, head)["model_id"]
            new = first["heads"][h.name]["model_id"]
            assert old != new
            old_ids[h.name] = old
            for table in ("models", "doc_state", "failed_docs", tables[h.name]):
                con.execute(f"UPDATE {table} SET model_id = ? WHERE model_id = ?", [old, new])
        assert con.execute("SELECT count(*) FROM doc_state WHERE model_id IN (SELECT unnest(?))",
                           [list(old_ids.values())]).fetchone()[0] == 40
    finally:
        con.close()

    again = process_corpus(config_path=cfg_path)
    for name in ("topic", "lang"):
        assert again["heads"][name]["inferred"] == 0, name
        assert again["heads"][name]["unchanged"] == 20, name
    # the old rows now carry the new id, so the latest views (latest model of each head) keep them all
    assert _fetch(db, "SELECT count(*) FROM latest_classifications")[0][0] == 20
    assert _fetch(db, "SELECT count(DISTINCT doc_id) FROM latest_languages")[0][0] == 20
    assert _fetch(db, "SELECT count(*) FROM doc_state WHERE model_id IN (SELECT unnest(?))",
                  [list(old_ids.values())])[0][0] == 0
    # the version-1 lineage stays recorded
    assert {r[0] for r in _fetch(db, "SELECT model_id FROM models")} >= set(old_ids.values())
    # and a third run still has nothing to do
    third = process_corpus(config_path=cfg_path)
    assert third["heads"]["topic"]["inferred"] == 0 and third["heads"]["lang"]["inferred"] == 0


def test_a_rerun_with_work_plans_the_corpus_once(tmp_path, tiny_models, prefect_harness, monkeypatch):
    """The preview (what has work, which models to load) is the first level's plan when nothing
    changes the database in between: a rerun with new documents scans the corpus once, not twice."""
    import storage.plan
    import tasks.corpus
    from flows.process_corpus import process_corpus

    cfg = _setup(tmp_path, tiny_models)
    process_corpus(config_path=cfg)
    rows = [{"id": i, "text": f"document number {i} about the budget", "lang": "en"} for i in range(20, 30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "b.parquet")
    plans: list[list[str]] = []
    real = storage.plan.open_plan

    def counting(database, files, heads, *args, **kwargs):
        plans.append(sorted(h.name for h in heads))
        return real(database, files, heads, *args, **kwargs)

    monkeypatch.setattr(storage.plan, "open_plan", counting)
    monkeypatch.setattr(tasks.corpus, "open_plan", counting)
    again = process_corpus(config_path=cfg)
    assert again["heads"]["topic"]["inferred"] == 10 and again["heads"]["lang"]["inferred"] == 10
    assert plans == [["lang", "topic"]]
    assert _fetch(str(tmp_path / "results.duckdb"), "SELECT count(*) FROM classifications")[0][0] == 30
