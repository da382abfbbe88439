"""Head DAG routing: heads reading upstream results (`where`, `input`, `source_lang`), ordered by level.

References come from the base tables themselves (what the upstream head stored) and from running the
downstream head alone over the upstream output, never from the routing code under test.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heads.engine import pipe
from heads.base import Doc
from heads.loading import RESIDENT, cached_head, load_head
from pipeline.config import ConfigError, HeadConfig, parse_config, where_references

ENGLISH = ["The committee approved the new budget for schools and hospitals after a long debate.",
           "Shares of the company rose sharply after the merger was announced on Monday morning.",
           "The striker scored twice in the second half and the crowd went wild.",
           "Heavy rain is expected across the north of the country for the rest of the week.",
           "The museum opened a new exhibition of paintings from the early twentieth century."]
GERMAN = ["Der Ausschuss hat den neuen Haushalt für Schulen und Krankenhäuser nach langer Debatte gebilligt.",
          "Die Aktien des Unternehmens sind nach der Ankündigung der Fusion am Montag stark gestiegen.",
          "Der Stürmer hat in der zweiten Halbzeit zweimal getroffen und die Zuschauer jubelten.",
          "Für den Rest der Woche wird im Norden des Landes starker Regen erwartet.",
          "Das Museum hat eine neue Ausstellung mit Gemälden aus dem frühen zwanzigsten Jahrhundert eröffnet."]


def _heads(**heads) -> dict:
    return {"corpus": "c.parquet", "database": "r.duckdb", "heads": heads}


def test_where_references_ignore_string_literals_and_other_names():
    names = ["topic", "ner", "top"]
    assert where_references("topic.label = 'business' AND topic.score > 0.8", names) == ["topic"]
    assert where_references("section = 'ner.x' AND \"ner\".n > 0", names) == ["ner"]
    assert where_references("topics.label = 'a'", names) == []


def test_levels_follow_where_input_depends_on_and_language(tmp_path, tiny_models):
    m = tiny_models
    cfg = parse_config(_heads(
        lang={"task": "language"},
        english={"task": "translation", "model": m["translation"], "source_lang": "de"},
        topic={"task": "classification", "model": m["classification"], "input": "english"},
        ner={"task": "ner", "model": m["ner"], "where": "topic.label = 'business'"},
        qa={"task": "qa", "model": m["qa"], "depends_on": ["lang"], "questions": ["Who?"]},
    ), tmp_path)
    assert [[h.name for h in level] for level in cfg.levels()] == [["lang"], ["english", "qa"], ["topic"], ["ner"]]
    assert cfg.routing(cfg.head("english")) == "\"lang\".language = 'de'"
    assert cfg.routing(cfg.head("topic")) == '"english".text IS NOT NULL'
    assert cfg.head("ner").table == "entities" and cfg.head("topic").table == "classifications"


@pytest.mark.parametrize("heads, message", [
    ({"a": {"where": "b.label = 'x'"}, "b": {"depends_on": ["a"]}}, "dependency cycle: a -> b -> a"),
    ({"a": {"depends_on": ["a"]}}, "is not another head"),
    ({"a": {"depends_on": ["zzz"]}}, "'zzz' is not another head"),
    ({"a": {"input": "b"}, "b": {}}, "must name a translation head"),
    ({"a": {"source_lang": "de"}}, "needs lang_column, or exactly one head with task = 'language'"),
    ({"a": {"source_lang": "german"}}, "two-letter ISO 639-1 code"),
])
def test_bad_dependencies_are_refused_with_the_key(tmp_path, tiny_models, heads, message):
    raw = {n: {"task": "classification", "model": tiny_models["classification"], **h} for n, h in heads.items()}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(_heads(**raw), tmp_path)


def test_resident_model_limit_unloads_least_recently_used(tiny_models):
    a = HeadConfig(name="lru_a", task="classification", model=tiny_models["classification"])
    b = HeadConfig(name="lru_b", task="ner", model=tiny_models["ner"])
    cached_head(a, 1)
    cached_head(b, 1)
    assert RESIDENT.names() == ["lru_b"]
    assert cached_head(b, 1) is cached_head(b, 1)
    cached_head(a, 2)
    assert RESIDENT.names() == ["lru_b", "lru_a"]


def _write(folder, rows):
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "c.parquet")


def _run(cfg_path):
    from flows.process_corpus import process_corpus

    return process_corpus(config_path=str(cfg_path))


def _rows(db, sql, params=()):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def test_where_on_upstream_label_routes_only_matching_documents(tmp_path, tiny_models, prefect_harness):
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(ENGLISH + GERMAN + [s.upper() for s in ENGLISH])]
    _write(tmp_path, rows)
    db = tmp_path / "r.duckdb"
    topic = f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
    (tmp_path / "one.toml").write_text(f'corpus = "c.parquet"\ndatabase = "r.duckdb"\nunit_docs = 4\n{topic}')
    _run(tmp_path / "one.toml")
    counts = _rows(db, "SELECT label, count(*) n FROM classifications GROUP BY label ORDER BY n DESC, label")
    label = counts[0][0]  # the tiny model is random: route on whatever it says most
    expected = {d for (d,) in _rows(db, "SELECT doc_id FROM classifications WHERE label = ?", [label])}
    assert 0 < len(expected) < len(rows) or len(counts) == 1

    ner = (f'[heads.ner]\ntask = "ner"\nmodel = "{tiny_models["ner"]}"\n'
           f"where = \"topic.label = '{label}' AND topic.score > 0\"\n")
    (tmp_path / "two.toml").write_text(f'corpus = "c.parquet"\ndatabase = "r.duckdb"\nunit_docs = 4\n{topic}{ner}')
    summary = _run(tmp_path / "two.toml")
    assert summary["heads"]["topic"]["inferred"] == 0  # unchanged upstream: not inferred again
    assert summary["heads"]["ner"]["routed"] == len(expected)
    assert {d for (d,) in _rows(db, "SELECT doc_id FROM doc_state WHERE head = 'ner'")} == expected
    # independent reference: the NER head alone over exactly the routed documents
    head = load_head("ner", "ner", tiny_models["ner"])
    docs = [Doc(r["id"], r["text"]) for r in rows if r["id"] in expected]
    want = sorted((d.doc_id, e["entity_group"], e["start_char"], e["end_char"])
                  for d, res in zip(docs, pipe(head, docs)) for e in res.rows)
    got = sorted(_rows(db, "SELECT doc_id, entity_group, start_char, end_char FROM entities WHERE head = 'ner'"))
    assert got == want

    again = _run(tmp_path / "two.toml")
    assert again["heads"]["ner"]["inferred"] == 0 and again["heads"]["topic"]["inferred"] == 0


def test_language_head_routes_translation_which_feeds_a_classifier(tmp_path, tiny_models, prefect_harness):
    rows = [{"id": f"e{i}", "text": t} for i, t in enumerate(ENGLISH)] + \
           [{"id": f"g{i}", "text": t} for i, t in enumerate(GERMAN)]
    _write(tmp_path, rows)
    (tmp_path / "dag.toml").write_text(f"""
corpus = "c.parquet"
database = "r.duckdb"
unit_docs = 3

[heads.lang]
task = "language"
languages = ["en", "de", "fr"]

[heads.english]
task = "translation"
model = "{tiny_models['translation']}"
source_lang = "de"
max_new_tokens = 12

[heads.topic_en]
task = "classification"
model = "{tiny_models['classification']}"
input = "english"
""")
    summary = _run(tmp_path / "dag.toml")
    assert summary["status"] == "completed", summary["file_errors"]
    db = tmp_path / "r.duckdb"
    detected = dict(_rows(db, "SELECT doc_id, language FROM languages"))
    assert detected == {r["id"]: ("de" if r["id"].startswith("g") else "en") for r in rows}
    translated = dict(_rows(db, "SELECT doc_id, translation FROM translations"))
    assert set(translated) == {r["id"] for r in rows if r["id"].startswith("g")}
    assert summary["heads"]["english"]["routed"] == len(GERMAN)

    # the classifier read the translations, not the German text: reference = the head over the translations
    head = load_head("topic_en", "classification", tiny_models["classification"])
    ids = sorted(translated)
    docs = [Doc(i, translated[i]) for i in ids if translated[i].strip()]
    want = {d.doc_id: res.rows[0]["label"] for d, res in zip(docs, pipe(head, docs))}
    got = dict(_rows(db, "SELECT doc_id, label FROM classifications WHERE head = 'topic_en'"))
    assert got == want
    failed = dict(_rows(db, "SELECT doc_id, source_file FROM failed_docs WHERE head = 'topic_en'"))
    assert set(failed) | set(got) == set(translated)
    assert all(f.endswith("c.parquet") for f in failed.values())  # failures name the corpus file

    markdown = _run_artifact(summary["run_id"])
    assert f"`{summary['run_id']}`" in markdown or summary["run_id"] in markdown
    for name, h in summary["heads"].items():
        assert name in markdown and str(h["inferred"]) in markdown

    again = _run(tmp_path / "dag.toml")
    assert all(h["inferred"] == 0 for h in again["heads"].values())


def _run_artifact(run_id: str) -> str:
    """The Markdown artifact the flow published for its run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["taskheads-run"]}, "flow_run_id": {"any_": [run_id]}},
            "limit": 10, "offset": 0, "sort": "CREATED_DESC"}).json()
    assert len(found) == 1 and found[0]["type"] == "markdown"
    return found[0]["data"]


def test_lang_column_routes_without_detection(tmp_path, tiny_models, prefect_harness):
    rows = [{"id": f"e{i}", "text": t, "lang": "en"} for i, t in enumerate(ENGLISH)] + \
           [{"id": f"g{i}", "text": t, "lang": "de"} for i, t in enumerate(GERMAN[:2])]
    _write(tmp_path, rows)
    (tmp_path / "p.toml").write_text(f"""
corpus = "c.parquet"
database = "r.duckdb"
lang_column = "lang"

[heads.english]
task = "translation"
model = "{tiny_models['translation']}"
source_lang = "de"
max_new_tokens = 8
""")
    summary = _run(tmp_path / "p.toml")
    assert summary["heads"]["english"]["routed"] == 2
    assert {d for (d,) in _rows(tmp_path / "r.duckdb", "SELECT doc_id FROM doc_state")} == {"g0", "g1"}


def test_cli_refuses_a_cycle_before_any_work(tmp_path, tiny_models):
    from taskheads.cli import main

    _write(tmp_path, [{"id": "1", "text": "x"}])
    m = tiny_models["classification"]
    (tmp_path / "cyc.toml").write_text(f"""
corpus = "c.parquet"
database = "r.duckdb"
[heads.a]
task = "classification"
model = "{m}"
where = "b.label = 'x'"
[heads.b]
task = "classification"
model = "{m}"
depends_on = ["a"]
""")
    assert main(["run", str(tmp_path / "cyc.toml")]) == 2
    assert not (tmp_path / "r.duckdb").exists()


def test_where_on_unknown_upstream_field_fails_preflight(tmp_path, tiny_models):
    from pipeline.preflight import preflight

    _write(tmp_path, [{"id": "1", "text": "x"}])
    m = tiny_models["classification"]
    cfg = parse_config(_heads(a={"task": "classification", "model": m},
                              b={"task": "classification", "model": m, "where": "a.colour = 'red'"}), tmp_path)
    with pytest.raises(ConfigError, match="heads.b.where: invalid predicate"):
        preflight(cfg)


def test_serve_drops_only_scheduled_runs_whose_time_passed(prefect_harness):
    """A restarted `serve` does not replay every missed slot (each would be a whole run, one after
    another); scheduled runs still ahead, and runs in other states, are kept."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Scheduled

    from taskheads.cli import drop_missed_runs

    now = datetime.now(timezone.utc)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("process-corpus")
        dep = client.create_deployment(flow_id=flow_id, name="missed-test")
        runs = {when: client.create_flow_run_from_deployment(dep, state=Scheduled(scheduled_time=now + when)).id
                for when in (timedelta(hours=-3), timedelta(minutes=-10), timedelta(seconds=-5),
                             timedelta(hours=1))}
        done = client.create_flow_run_from_deployment(dep, state=Completed()).id
        assert drop_missed_runs("process-corpus/missed-test") == 2
        left = {r.id for r in client.read_flow_runs(limit=200) if r.deployment_id == dep}
    assert left == {runs[timedelta(seconds=-5)], runs[timedelta(hours=1)], done}  # 5 s late: within grace
    assert drop_missed_runs("process-corpus/no-such-deployment") == 0


def test_upstream_head_named_like_a_corpus_column_is_refused(tmp_path, tiny_models):
    from pipeline.preflight import preflight

    _write(tmp_path, [{"id": "1", "text": "x", "topic": "sport"}])
    m = tiny_models["classification"]
    cfg = parse_config(_heads(topic={"task": "classification", "model": m},
                              b={"task": "classification", "model": m, "where": "topic.label = 'x'"}), tmp_path)
    with pytest.raises(ConfigError, match="reads head 'topic', which is also the name of a corpus column"):
        preflight(cfg)


def test_rerun_routes_new_documents_to_a_downstream_head(tmp_path, tiny_models, prefect_harness):
    """A rerun over an existing database with new documents: the downstream head is planned from the
    upstream results of this run (loaded first), not from what the database held before the run.
    (Found by the demo: its QA head, routed by the topic head, routed 0 documents.)"""
    first = [{"id": f"a{i}", "text": t} for i, t in enumerate(ENGLISH)]
    _write(tmp_path, first)
    topic = f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
    ner = (f'[heads.ner]\ntask = "ner"\nmodel = "{tiny_models["ner"]}"\n'
           f"where = \"topic.score > 0\"\n")
    (tmp_path / "dag.toml").write_text(f'corpus = "c.parquet"\ndatabase = "r.duckdb"\nunit_docs = 4\n{topic}{ner}')
    once = _run(tmp_path / "dag.toml")
    assert once["heads"]["ner"]["routed"] == len(first)
    new = [{"id": f"b{i}", "text": t} for i, t in enumerate(GERMAN)]
    _write(tmp_path, first + new)
    again = _run(tmp_path / "dag.toml")
    assert again["heads"]["topic"]["inferred"] == len(new)
    assert again["heads"]["ner"]["routed"] == len(first) + len(new)
    assert again["heads"]["ner"]["inferred"] == len(new)
    stored = {d for (d,) in _rows(tmp_path / "r.duckdb", "SELECT doc_id FROM doc_state WHERE head = 'ner'")}
    assert stored == {r["id"] for r in first + new}
