"""A new head is one file and one registry line: this module is that file (a model-free word counter
with its own result table), and the test registers it with one line and runs it through the flow,
with a downstream head routing on what it declares a `where` can see."""
from __future__ import annotations

from typing import Annotated, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core.config import HeadParams
from core.tables import ResultTable
from heads import registry
from heads.base import Doc, Feature, Head

WORD_COUNTS = ResultTable(
    "word_counts", (pa.field("words", pa.int64()), pa.field("longest", pa.string())),
    upstream="'words': any_value(r.words), 'longest': any_value(r.longest)",
    doc="one row per document: how many words it has, and its longest")


class WordCountParams(HeadParams):
    min_length: Annotated[int, Field(ge=1)] = 1
    """words shorter than this are not counted"""


class WordCountHead(Head):
    """Counts whitespace-separated words (no model)."""

    task = "wordcount"
    table = "word_counts"
    tables = (WORD_COUNTS,)
    model_class = None
    default_model = "whitespace"
    Params = WordCountParams

    def encode(self, doc: Doc) -> list[Feature]:
        words = [w for w in doc.text.split() if len(w) >= self.p["min_length"]]
        return [Feature(0, [0] * max(len(words), 1), meta={"words": words})]

    def forward(self, feats: Sequence[Feature]) -> list[int]:
        return [len(f.meta["words"]) for f in feats]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[int]) -> list[dict]:
        words = feats[0].meta["words"]
        return [{"words": outs[0], "longest": max(words, key=len) if words else None}]


TEXTS = {"a": "one two three four five", "b": "short text", "c": "a bb ccc dddd eeeee ffffff", "d": "x"}


def test_a_head_in_one_file_and_one_registry_line_runs_end_to_end(tmp_path, tiny_models, monkeypatch,
                                                                    prefect_harness):
    monkeypatch.setitem(registry.HEADS, "wordcount", f"{__name__}:WordCountHead")  # the registry line

    from flows.process_corpus import process_corpus

    pq.write_table(pa.table({"id": list(TEXTS), "text": list(TEXTS.values())}), tmp_path / "c.parquet")
    config = tmp_path / "pipeline.toml"
    config.write_text(f'corpus = "c.parquet"\ndatabase = "out.duckdb"\n'
                      f'[heads.wc]\ntask = "wordcount"\nmin_length = 2\n'
                      f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
                      f'where = "wc.words >= 3"\n')
    summary = process_corpus(config_path=str(config))
    assert summary["status"] == "completed", summary
    expected = {d: sum(len(w) >= 2 for w in t.split()) for d, t in TEXTS.items()}
    con = duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True)
    try:
        got = dict(con.execute("SELECT doc_id, words FROM word_counts WHERE head = 'wc'").fetchall())
        latest = dict(con.execute("SELECT doc_id, longest FROM latest_word_counts").fetchall())
        routed = {r[0] for r in con.execute("SELECT doc_id FROM classifications WHERE head = 'topic'").fetchall()}
        model = con.execute("SELECT source, params FROM models WHERE head = 'wc'").fetchone()
    finally:
        con.close()
    assert got == expected
    assert latest == {"a": "three", "b": "short", "c": "ffffff", "d": None}
    assert routed == {d for d, n in expected.items() if n >= 3} == {"a", "c"}
    assert model == ("whitespace", '{"min_length": 2}')
