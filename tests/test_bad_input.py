"""Every input row ends up as a result or a failed_docs row with a specific reason."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MILLION = ("Grace Hopper met Ada Lovelace in Zurich . " * 25000)[:1_000_000]
GOOD = {
    "plain": "Grace Hopper founded Initech in Lagos .",
    "million": MILLION,
    "control": "Ada\x00Lovelace \x01\x07 met \x1b[31m Grace\x7f Hopper \r\n in Zurich",
    "emoji": "👩‍👩‍👧‍👦 family of Ada 🏳️‍🌈 in Zürich 🇳🇬 Lagos 👍🏽",
    "rtl": "שלום עולם مرحبا بالعالم Grace Hopper \u202eevil\u202c text",
    "mixed": "東京 Tokyo Москва Moscow Αθήνα Athens 서울 Seoul e\u0301te\u0301",
}
BAD = {"null-text": (None, "null text"), "empty": ("", "empty text"),
       "blank": ("\u3000\t\n  ", "whitespace-only text")}


@pytest.fixture(scope="module", params=["duckdb", "lake"])
def run(request, tmp_path_factory, tiny_models, prefect_harness):
    """The same input on both backends: a `.duckdb` file and a DuckLake with a SQLite catalog."""
    from flows.process_corpus import process_corpus
    from storage.db import connect

    root = tmp_path_factory.mktemp("bad")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = [{"id": k, "text": v} for k, v in GOOD.items()] + [{"id": k, "text": v} for k, (v, _) in BAD.items()]
    rows += [{"id": None, "text": "no id here"},
             {"id": "plain", "text": "Another text under an id that is already taken"},  # conflict
             {"id": "emoji", "text": GOOD["emoji"]}]  # identical repeat: skipped, not an error
    pq.write_table(pa.Table.from_pylist(rows), corpus / "a.parquet")
    pq.write_table(pa.table({"id": ["n1", "n2"], "text": [1, 2]}), corpus / "numbers.parquet")
    os.symlink(root / "gone.parquet", corpus / "dead.parquet")
    (root / "p.toml").write_text(f"""
corpus = "corpus"
database = "{'r.duckdb' if request.param == 'duckdb' else 'ducklake:sqlite:r.sqlite'}"
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
ignore_labels = []
""")
    summary = process_corpus(config_path=str(root / "p.toml"))
    con = connect(str(root / "r.duckdb") if request.param == "duckdb" else f"ducklake:sqlite:{root / 'r.sqlite'}",
                  read_only=True)
    yield summary, con
    con.close()


def test_file_faults_are_named_and_the_rest_runs(run):
    summary, _ = run
    assert summary["status"] == "completed_with_errors"
    (error,) = summary["file_errors"]
    assert "dead.parquet: not a readable Parquet file" in error
    assert summary["docs_read"] == len(GOOD) + len(BAD) + 3 + 2


@pytest.mark.parametrize("head, table", [("topic", "classifications"), ("people", "entities")])
def test_every_row_is_a_result_or_a_failure(run, head, table):
    summary, con = run
    done = {r[0] for r in con.execute(f"SELECT DISTINCT doc_id FROM {table} WHERE head = ?", [head]).fetchall()}
    failed = {(r[0], r[1]): r[2] for r in con.execute(
        "SELECT doc_id, source_row, error FROM failed_docs WHERE head = ?", [head]).fetchall()}
    if table == "classifications":
        assert done == set(GOOD)
    else:  # a random NER model may find no entity in a document; its state still says done
        state = dict(con.execute("SELECT doc_id, status FROM doc_state WHERE head = ?", [head]).fetchall())
        assert {d for d, st in state.items() if st == "done"} == set(GOOD) and done <= set(GOOD)
    reasons = {doc_id: err for (doc_id, _), err in failed.items()}
    for key, (_, reason) in BAD.items():
        assert reasons[key] == reason
    assert reasons[None] == "null id (row 9 of a.parquet)"
    assert reasons["plain"] == "duplicate id with different text (first seen in a.parquet row 0)"
    assert reasons["n1"] == reasons["n2"] == "text is not a string (int)"
    assert len(failed) == len(BAD) + 4
    h = summary["heads"][head]
    assert h["duplicates"] == 1 and h["routed"] == len(GOOD) + len(BAD) + 3 + 2


def test_million_character_document_is_windowed_not_truncated(run):
    _, con = run
    (n_chunks,) = con.execute("SELECT n_chunks FROM classifications WHERE doc_id = 'million'").fetchone()
    assert n_chunks > 1000  # 64-token windows over ~200k tokens
    (last_end,) = con.execute("SELECT max(end_char) FROM entities WHERE doc_id = 'million'").fetchone()
    assert last_end > 990_000  # entities found up to the end of the text


def test_entity_offsets_slice_the_original_text(run):
    _, con = run
    rows = con.execute("SELECT doc_id, text, start_char, end_char FROM entities").fetchall()
    assert {r[0] for r in rows} >= {"plain", "control", "emoji", "rtl", "mixed"}
    for doc_id, text, start, end in rows:
        assert GOOD[doc_id][start:end] == text
