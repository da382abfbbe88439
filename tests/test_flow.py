"""The whole flow under Prefect: Parquet corpus -> four heads -> DuckDB, against references.

References are independent of the engine: each document alone through the model (classification
windows, per-document generate), the HF token-classification pipeline, and a brute-force span search.
"""
from __future__ import annotations

import types

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer, pipeline)

from heads.base import softmax
from test_classification import _window_logits
from test_qa import reference as qa_reference

QUESTIONS = ["Who runs the company?"]


def make_corpus(folder):
    rng = np.random.default_rng(0)
    words = ("Ada Lovelace founded Initech in Zurich . Grace Hopper runs the company from Lagos ; shares rose "
             "12 % after the merger with Globex . The striker scored twice . Parliament voted on the budget").split()
    rows = []
    for i in range(24):
        n = int(rng.integers(3, 40)) if i != 7 else 400  # doc 7 needs several windows
        text = " ".join(rng.choice(words, n))
        rows.append({"id": i, "text": text, "lang": "de" if i % 5 == 0 else "en",
                     "section": "business" if i % 2 else "sport",
                     "question": "Where is it?" if i % 4 == 1 else None})
    rows.append({"id": 100, "text": "  ", "lang": "en", "section": "business", "question": None})
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:12]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[12:]), folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    return {str(r["id"]): r for r in rows}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_models, prefect_harness):
    from flows.process_corpus import process_corpus

    root = tmp_path_factory.mktemp("flow")
    docs = make_corpus(root / "corpus")
    cfg = root / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 8

[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"

[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
aggregation = "simple"
where = "lang = 'en'"

[heads.facts]
task = "qa"
model = "{tiny_models['qa']}"
questions = {QUESTIONS!r}
question_column = "question"
doc_stride = 32
where = "section = 'business'"

[heads.english]
task = "translation"
model = "{tiny_models['translation']}"
max_new_tokens = 12
where = "lang = 'de'"
""".replace("'[", "[").replace("]'", "]"))
    summary = process_corpus(config_path=str(cfg))
    return types.SimpleNamespace(root=root, cfg=cfg, docs=docs, summary=summary, db=str(root / "results.duckdb"),
                                 models=tiny_models, process_corpus=process_corpus)


def fetch(db, sql):
    con = duckdb.connect(db, read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def test_summary_and_run_lineage(flow_run):
    s = flow_run.summary
    assert s["status"] == "completed_with_errors"  # c.parquet is not Parquet: named, the rest ran
    assert len(s["file_errors"]) == 1 and "c.parquet: not a readable Parquet file" in s["file_errors"][0]
    assert s["docs_read"] == 25 and s["files"] == 3
    en = [d for d in flow_run.docs.values() if d["lang"] == "en"]
    assert s["heads"]["topic"]["routed"] == 25 and s["heads"]["topic"]["failed"] == 1
    assert s["heads"]["people"]["routed"] == len(en)
    (run,) = fetch(flow_run.db, "SELECT * FROM runs")
    assert run["run_id"] == s["run_id"] and run["status"] == "completed_with_errors"
    assert run["finished_at"] >= run["started_at"] and run["docs_read"] == 25
    models = fetch(flow_run.db, "SELECT * FROM models ORDER BY head")
    assert [m["head"] for m in models] == ["english", "facts", "people", "topic"]
    assert all(len(m["weights_sha256"]) == 64 for m in models)
    failed = fetch(flow_run.db, "SELECT head, doc_id, error, stage FROM failed_docs ORDER BY head")
    assert failed == [{"head": h, "doc_id": "100", "error": "whitespace-only text", "stage": "read"}
                      for h in ("facts", "people", "topic")]
    # every routed input row is a result or a failure, per head
    for head, table, key in (("topic", "classifications", "doc_id"), ("english", "translations", "doc_id")):
        n = fetch(flow_run.db, f"SELECT count(DISTINCT {key}) AS n FROM {table} WHERE head = '{head}'")[0]["n"]
        assert n + s["heads"][head]["failed"] == s["heads"][head]["routed"]


def test_classifications_match_single_document_reference(flow_run):
    path = flow_run.models["classification"]
    model, tok = AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = fetch(flow_run.db, "SELECT * FROM classifications")
    assert len(rows) == 24 and len({r["doc_id"] for r in rows}) == 24
    for r in rows:
        probs = softmax(_window_logits(model, tok, flow_run.docs[r["doc_id"]]["text"], 64, 32)).mean(axis=0)
        assert r["label"] == model.config.id2label[int(probs.argmax())]
        assert r["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert max(r["n_chunks"] for r in rows) > 1


def test_entities_match_hf_pipeline(flow_run):
    path = flow_run.models["ner"]
    ref = pipeline("token-classification", model=AutoModelForTokenClassification.from_pretrained(path),
                   tokenizer=AutoTokenizer.from_pretrained(path), aggregation_strategy="simple")
    rows = fetch(flow_run.db, "SELECT * FROM entities ORDER BY doc_id, start_char")
    assert rows, "the random model predicts entities; none stored means the head is broken"
    checked = 0
    for doc_id, doc in flow_run.docs.items():
        text = doc["text"]
        mine = [(r["entity_group"], r["start_char"], r["end_char"]) for r in rows if r["doc_id"] == doc_id]
        for r in (r for r in rows if r["doc_id"] == doc_id):
            assert text[r["start_char"]:r["end_char"]] == r["text"]
        if doc["lang"] != "en" or not text.strip() or len(ref.tokenizer(text)["input_ids"]) > 64:
            assert doc["lang"] == "en" or not mine
            continue
        expected = [(e["entity_group"], e["start"], e["end"]) for e in ref(text)]
        assert mine == expected
        checked += 1
    assert checked >= 15


def test_answers_match_brute_force_reference(flow_run):
    path = flow_run.models["qa"]
    tiny = types.SimpleNamespace(ref_model=AutoModelForQuestionAnswering.from_pretrained(path).eval(),
                                 ref_tok=AutoTokenizer.from_pretrained(path))
    rows = fetch(flow_run.db, "SELECT * FROM answers ORDER BY doc_id, question")
    expected_keys = set()
    for doc_id, doc in flow_run.docs.items():
        if doc["section"] == "business" and doc["text"].strip():
            for q in QUESTIONS + ([doc["question"]] if doc["question"] else []):
                expected_keys.add((doc_id, q))
    assert {(r["doc_id"], r["question"]) for r in rows} == expected_keys
    for r in rows:
        text = flow_run.docs[r["doc_id"]]["text"]
        ref = qa_reference(tiny, text, r["question"], 128, 32, 15)
        assert (r["start_char"], r["end_char"]) == (ref["start_char"], ref["end_char"])
        assert r["answer"] == text[r["start_char"]:r["end_char"]]
        assert r["score"] == pytest.approx(ref["score"], rel=1e-4, abs=1e-6)


def test_translations_match_per_document_generate(flow_run):
    path = flow_run.models["translation"]
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = fetch(flow_run.db, "SELECT * FROM translations ORDER BY doc_id")
    de = sorted(k for k, d in flow_run.docs.items() if d["lang"] == "de")
    assert [r["doc_id"] for r in rows] == de
    for r in rows:
        enc = tok(flow_run.docs[r["doc_id"]]["text"], return_tensors="pt", return_token_type_ids=False)
        assert r["n_segments"] == 1
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, num_beams=1, do_sample=False)
        assert r["translation"] == tok.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


RESULT_TABLES = ["classifications", "entities", "answers", "translations", "failed_docs", "doc_state"]


def snapshot(db):
    out = {t: fetch(db, f"SELECT * EXCLUDE (updated_at) FROM {t} ORDER BY ALL" if t == "doc_state"
                    else f"SELECT * FROM {t} ORDER BY ALL") for t in RESULT_TABLES}
    out["run_ids"] = fetch(db, "SELECT run_id FROM runs ORDER BY started_at")
    return out


def test_rerun_infers_nothing_and_leaves_tables_identical(flow_run):
    before = snapshot(flow_run.db)
    second = flow_run.process_corpus(config_path=str(flow_run.cfg))
    after = snapshot(flow_run.db)
    assert after.pop("run_ids")[-1] == {"run_id": second["run_id"]}
    before.pop("run_ids")
    assert after == before
    for name, h in second["heads"].items():
        assert h["inferred"] == 0, name
        # the unchanged bad row (whitespace-only text: a terminal failure) is not retried either
        assert h["unchanged"] + h["skipped_failed"] == flow_run.summary["heads"][name]["routed"]
        assert h["skipped_failed"] == flow_run.summary["heads"][name]["failed"]
    (run,) = fetch(flow_run.db, f"SELECT * FROM runs WHERE run_id = '{second['run_id']}'")
    assert run["docs_inferred"] == 0 and run["docs_skipped"] > 0 and run["docs_read"] == 25


def test_changed_document_is_the_only_one_reinferred_and_full_redoes_all(flow_run, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(flow_run.root / "corpus", corpus)
    db = str(tmp_path / "inc.duckdb")
    first = flow_run.process_corpus(config_path=str(flow_run.cfg), corpus=str(corpus), database=db)
    table = pq.read_table(corpus / "b.parquet").to_pylist()
    changed = next(r for r in table if r["lang"] == "en" and r["section"] == "business")
    changed["text"] = "Completely new text about Grace Hopper in Lagos ."
    pq.write_table(pa.Table.from_pylist(table), corpus / "b.parquet")
    second = flow_run.process_corpus(config_path=str(flow_run.cfg), corpus=str(corpus), database=db)
    assert {n: h["inferred"] for n, h in second["heads"].items()} == {"topic": 1, "people": 1, "facts": 1,
                                                                       "english": 0}
    rows = fetch(db, "SELECT doc_id, run_id FROM classifications")
    assert {r["doc_id"] for r in rows if r["run_id"] == second["run_id"]} == {str(changed["id"])}
    assert sum(r["run_id"] == first["run_id"] for r in rows) == 23
    third = flow_run.process_corpus(config_path=str(flow_run.cfg), corpus=str(corpus), database=db, full=True)
    assert third["heads"]["topic"]["inferred"] == 24 and third["heads"]["topic"]["unchanged"] == 0
    assert fetch(db, "SELECT DISTINCT run_id FROM classifications") == [{"run_id": third["run_id"]}]
    assert fetch(db, "SELECT count(*) AS n FROM classifications")[0]["n"] == 24


def test_cli_run_prints_summary_and_flags_bad_file(flow_run, capsys):
    from taskheads.cli import main

    status = main(["run", str(flow_run.cfg), "--db", str(flow_run.root / "cli.duckdb")])
    out = capsys.readouterr().out
    assert status == 1  # c.parquet could not be read; the other files ran
    assert "docs read: 25 from 3 file(s)" in out
    assert "error: " in out and "c.parquet: not a readable Parquet file" in out
    for head in ("topic", "people", "facts", "english"):
        assert any(line.startswith(head) for line in out.splitlines())
    assert main(["sql", str(flow_run.root / "cli.duckdb"), "SELECT count(*) AS n FROM classifications"]) == 0
    assert "24" in capsys.readouterr().out


def test_unloadable_hub_model_is_one_line_naming_the_key(flow_run, tmp_path, capsys):
    from taskheads.cli import main

    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'corpus = "{flow_run.root / "corpus" / "a.parquet"}"\ndatabase = "x.duckdb"\n'
                   '[heads.topic]\ntask = "classification"\nmodel = "no-such-org/no-such-model"\nrevision = "main"\n')
    assert main(["run", str(cfg)]) == 2  # a config problem, refused before the run writes anything
    err = capsys.readouterr().err
    assert "heads.topic.model: cannot load 'no-such-org/no-such-model'" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x.duckdb").exists()


def _one_head_config(tmp_path, model, extra=""):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'corpus = "corpus"\ndatabase = "r.duckdb"\n[heads.topic]\ntask = "classification"\n'
                   f'model = "{model}"\n{extra}')
    return cfg


def test_glob_characters_in_file_names_are_read_literally(tmp_path, tiny_models, prefect_harness):
    """`a*.parquet` next to `ab.parquet`, `x?.parquet` next to `xy.parquet`, `[b].parquet` next to
    `b.parquet`: every row inferred exactly once, from its own file; gold evaluation counts each once."""
    from flows.process_corpus import process_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    names = ["a*.parquet", "ab.parquet", "x?.parquet", "xy.parquet", "[b].parquet", "b.parquet"]
    expected = {}
    for k, name in enumerate(names):
        ids = [10 * k, 10 * k + 1]
        texts = [f"text {i} of {name}" for i in ids]
        pq.write_table(pa.table({"id": ids, "text": texts, "gold": ["POS", "NEG"]}), folder / name)
        expected.update({str(i): t for i, t in zip(ids, texts)})
    cfg = _one_head_config(tmp_path, tiny_models["classification"], 'gold_column = "gold"\n')
    summary = process_corpus(config_path=str(cfg))
    db = str(tmp_path / "r.duckdb")
    assert summary["status"] == "completed" and summary["docs_read"] == 12
    assert summary["heads"]["topic"]["inferred"] == 12 and summary["heads"]["topic"]["failed"] == 0
    rows = fetch(db, "SELECT doc_id FROM classifications ORDER BY doc_id")
    assert sorted(r["doc_id"] for r in rows) == sorted(expected)  # each once, none missing
    assert fetch(db, "SELECT count(*) AS n FROM failed_docs")[0]["n"] == 0
    assert {r["n"] for r in fetch(db, "SELECT n FROM evaluations WHERE source = 'corpus'")} == {12}
    again = process_corpus(config_path=str(cfg))
    assert again["heads"]["topic"]["inferred"] == 0 and again["heads"]["topic"]["unchanged"] == 12


def test_ids_of_any_type_are_one_string_and_not_reinferred(tmp_path, tiny_models, prefect_harness):
    """Bool, timestamp with time zone, blob, float, decimal and date ids: the stored doc_id is DuckDB's
    CAST(id AS VARCHAR) text (UTC), and a rerun infers nothing."""
    import datetime as dt
    import decimal

    from flows.process_corpus import process_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    columns = {
        "bool": pa.array([True, False]),
        "tstz": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=dt.timezone.utc),
                          dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))],
                         pa.timestamp("us", tz="Europe/Berlin")),
        "blob": pa.array([b"\x00\xffid", b"plain"], pa.binary()),
        "float32": pa.array([0.1, 2.5], pa.float32()),
        "float64": pa.array([0.3, 1e20], pa.float64()),
        "decimal": pa.array([decimal.Decimal("1.50"), decimal.Decimal("-2.00")], pa.decimal128(10, 2)),
        "date": pa.array([dt.date(2024, 2, 29), dt.date(1999, 12, 31)], pa.date32()),
    }
    for name, ids in columns.items():
        pq.write_table(pa.table({"id": ids, "text": [f"{name} one", f"{name} two"]}), folder / f"{name}.parquet")
    ref = duckdb.connect()  # the reference text: DuckDB's own cast, in UTC
    ref.execute("SET TimeZone = 'UTC'")
    expected = sorted(r[0] for name in columns for r in ref.execute(
        "SELECT CAST(id AS VARCHAR) FROM read_parquet(?)", [str(folder / f"{name}.parquet")]).fetchall())
    ref.close()
    assert "true" in expected and "2024-01-02 03:04:05.6+00" in expected and "0.1" in expected
    cfg = _one_head_config(tmp_path, tiny_models["classification"])
    first = process_corpus(config_path=str(cfg))
    db = str(tmp_path / "r.duckdb")
    assert first["heads"]["topic"]["inferred"] == 14 and first["heads"]["topic"]["failed"] == 0
    assert sorted(r["doc_id"] for r in fetch(db, "SELECT doc_id FROM classifications")) == expected
    assert sorted(r["doc_id"] for r in fetch(db, "SELECT doc_id FROM doc_state")) == expected
    second = process_corpus(config_path=str(cfg))
    assert second["heads"]["topic"]["inferred"] == 0 and second["heads"]["topic"]["unchanged"] == 14
