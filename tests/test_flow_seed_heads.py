"""The remaining seed heads (masked_lm, causal_lm, multiple_choice) through the whole flow into DuckDB."""
from __future__ import annotations

import math
import types

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from taskheads.tiny_models import build_bert, build_causal_lm

TEXTS = ["Ada Lovelace wrote the first program .", "Markets rose on Monday after the report [MASK] out .",
         "The striker scored twice .", "Parliament [MASK] on the budget [MASK] .",
         "Chips and films sold well in Tokyo and Lagos this year , analysts said ."]


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    from flows.process_corpus import process_corpus

    root = tmp_path_factory.mktemp("seed")
    m = {"mlm": build_bert(root / "mlm", "masked_lm", max_len=64, seed=1),
         "mc": build_bert(root / "mc", "multiple_choice", max_len=64, seed=2),
         "clm": build_causal_lm(root / "clm", "llama", max_len=64, seed=3)}
    (root / "corpus").mkdir()
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS,
                             "options": [["sport", "tech"], None, ["sport"], None, ["film", "chips", "tech"]]}),
                   root / "corpus" / "c.parquet")
    (root / "p.toml").write_text(f"""
corpus = "corpus"
database = "r.duckdb"
[heads.fill]
task = "masked_lm"
model = "{m['mlm']}"
mode = "fill_mask"
top_k = 3
[heads.pppl]
task = "masked_lm"
model = "{m['mlm']}"
mode = "pseudo_perplexity"
[heads.ppl]
task = "causal_lm"
model = "{m['clm']}"
mode = "perplexity"
[heads.summary]
task = "causal_lm"
model = "{m['clm']}"
mode = "generate"
prompt = "Summarize: {{text}} Summary:"
max_new_tokens = 6
[heads.topic]
task = "multiple_choice"
model = "{m['mc']}"
choices = ["business", "politics"]
choices_column = "options"
""")
    summary = process_corpus(config_path=str(root / "p.toml"))
    con = duckdb.connect(str(root / "r.duckdb"), read_only=True)
    yield types.SimpleNamespace(summary=summary, con=con, models=m)
    con.close()


def test_every_head_ran_every_document(run):
    for name, h in run.summary["heads"].items():
        assert (h["routed"], h["inferred"], h["done"], h["failed"]) == (5, 5, 5, 0), name


def test_fill_mask_rows(run):
    rows = run.con.execute("SELECT doc_id, mask_index, token_id, score, rank FROM fill_mask "
                           "ORDER BY doc_id, mask_index, rank").fetchall()
    assert {(d, i) for d, i, *_ in rows} == {("1", 0), ("3", 0), ("3", 1)}
    assert len(rows) == 3 * 3
    model = AutoModelForMaskedLM.from_pretrained(run.models["mlm"]).eval()
    tok = AutoTokenizer.from_pretrained(run.models["mlm"])
    enc = tok(TEXTS[3], return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1)
    positions = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
    for mask_index, pos in enumerate(positions):
        top = probs[pos].topk(3)
        got = [(tid, score) for d, i, tid, score, _ in rows if d == "3" and i == mask_index]
        assert [t for t, _ in got] == top.indices.tolist()
        assert [s for _, s in got] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_lm_scores_rows(run):
    rows = dict(run.con.execute("SELECT doc_id, perplexity FROM lm_scores WHERE head = 'ppl'").fetchall())
    model = AutoModelForCausalLM.from_pretrained(run.models["clm"]).eval()
    tok = AutoTokenizer.from_pretrained(run.models["clm"])
    for i, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok("x")["input_ids"][0] == tok.cls_token_id:  # the head adds bos when the tokenizer adds specials
            ids = [tok.cls_token_id] + ids
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        assert rows[str(i)] == pytest.approx(math.exp(loss), rel=1e-4)
    pppl = run.con.execute("SELECT count(*), min(pseudo_perplexity) FROM lm_scores WHERE head = 'pppl'").fetchone()
    assert pppl[0] == 5 and pppl[1] > 1.0


def test_generations_and_choices_rows(run):
    gens = run.con.execute("SELECT doc_id, prompt_id, n_new_tokens, finish_reason FROM generations").fetchall()
    assert len(gens) == 5 and all(p == 0 and 1 <= n <= 6 and r in ("eos", "length") for _, p, n, r in gens)
    per_doc = run.con.execute("SELECT doc_id, count(*), sum(score), min(rank), max(rank) FROM choices "
                              "GROUP BY doc_id ORDER BY doc_id").fetchall()
    assert [n for _, n, *_ in per_doc] == [4, 2, 3, 2, 5]
    for _, n, total, lo, hi in per_doc:
        assert total == pytest.approx(1.0) and (lo, hi) == (1, n)
