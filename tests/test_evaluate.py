"""Gold-column evaluation: every run scores the head on the labelled rows and stores the metric."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.evaluate import classification_metrics
from taskheads.cli import main


def test_classification_metrics_by_hand():
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("c", "b")]
    m = classification_metrics(pairs)
    assert m["accuracy"] == 0.5
    # F1 per label: a 2/3, b 2*1/(2+0+2)=0.5, c 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert classification_metrics([]) == {}


def test_run_evaluates_against_gold_and_stores_it(tmp_path, tiny_models, prefect_harness, capsys):
    from flows.process_corpus import process_corpus

    texts = [f"document number {i} about " + ["markets", "football", "elections"][i % 3] * (1 + i % 4)
             for i in range(30)]
    gold = ["business", "sport", "politics"] * 10
    gold[3] = None  # unlabelled rows are not counted
    pq.write_table(pa.table({"id": list(range(30)), "text": texts, "topic": gold}), tmp_path / "c.parquet")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'corpus = "c.parquet"\ndatabase = "r.duckdb"\n[heads.topic]\ntask = "classification"\n'
                   f'model = "{tiny_models["classification"]}"\ngold_column = "topic"\n')
    summary = process_corpus(config_path=str(cfg))
    con = duckdb.connect(str(tmp_path / "r.duckdb"), read_only=True)
    predicted = dict(con.execute("SELECT doc_id, label FROM classifications").fetchall())
    stored = {m: (v, n) for m, v, n in con.execute("SELECT metric, value, n FROM evaluations "
                                                     "WHERE head = 'topic' AND source = 'corpus'").fetchall()}
    con.close()
    labelled = [(predicted[str(i)], g) for i, g in enumerate(gold) if g is not None]
    expected = sum(p == g for p, g in labelled) / len(labelled)
    assert stored["accuracy"] == (pytest.approx(expected), 29)
    assert summary["heads"]["topic"]["metrics"]["accuracy"] == pytest.approx(expected)
    # a rerun infers nothing but still evaluates the whole labelled corpus
    again = process_corpus(config_path=str(cfg))
    assert again["heads"]["topic"]["inferred"] == 0
    assert again["heads"]["topic"]["metrics"]["n"] == 29


def test_gold_column_must_exist(tmp_path, tiny_models, capsys):
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / "c.parquet")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'corpus = "c.parquet"\ndatabase = "r.duckdb"\n[heads.topic]\ntask = "classification"\n'
                   f'model = "{tiny_models["classification"]}"\ngold_column = "topic"\n')
    assert main(["run", str(cfg)]) == 2
    assert "heads.topic.gold_column: no column 'topic'" in capsys.readouterr().err
