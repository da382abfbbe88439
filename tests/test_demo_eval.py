"""The demo's measured figures: retrieval (k nearest neighbours with the same gold topic) and the NER
head's agreement per type with a reference tagger, computed by hand here and stored in `evaluations`."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

from core.metrics import entity_prf_by_label
from heads.registry import result_tables
from storage.db import connect, ensure_schema
from taskheads import demo


def test_knn_same_label_by_hand():
    # four points on a line of angles: a, b close; c, d close; e far from all
    angles = np.radians([0, 10, 90, 100, 200])
    mat = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1], [3], [2], [1], [5]])  # norms differ
    labels = ["x", "x", "y", "y", "x"]
    # k=1: a->b (x), b->a (x), c->d (y), d->c (y), e(200°)->a(0°: 160° away) vs d(100°: 100° away) -> d (y)
    assert demo.knn_same_label(mat, labels, k=1).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    # k=2: a: b, then c (90°) vs e (160°) -> c: 1/2; c: d, b (80°) -> 1/2; e: d, c -> 0
    assert demo.knn_same_label(mat, labels, k=2).tolist() == [0.5, 0.5, 0.5, 0.5, 0.0]
    # k larger than the others: every other point counts
    assert demo.knn_same_label(mat, labels, k=10).tolist() == pytest.approx([2 / 4, 2 / 4, 1 / 4, 1 / 4, 2 / 4])


def test_knn_never_counts_the_document_itself():
    mat = np.eye(3)  # orthogonal: every neighbour at similarity 0, the document itself at 1
    assert demo.knn_same_label(mat, ["a", "b", "c"], k=1).tolist() == [0.0, 0.0, 0.0]


def test_entity_prf_by_label_by_hand():
    gold = [{(0, 5, "PER"), (10, 15, "ORG")}, {(0, 3, "ORG")}]
    pred = [{(0, 5, "PER"), (10, 14, "ORG"), (20, 23, "ORG")}, {(0, 3, "ORG"), (5, 9, "LOC")}]
    out = entity_prf_by_label(gold, pred, ["PER", "ORG", "LOC", "DATE"])
    assert out["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "n_gold": 1, "n_pred": 1}
    assert out["ORG"]["precision"] == pytest.approx(1 / 3) and out["ORG"]["recall"] == pytest.approx(1 / 2)
    assert out["ORG"]["f1"] == pytest.approx(0.4) and (out["ORG"]["n_gold"], out["ORG"]["n_pred"]) == (2, 3)
    assert out["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n_gold": 0, "n_pred": 1}
    assert out["DATE"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n_gold": 0, "n_pred": 0}


def _results_db(path):
    """A results database with one NER head and one embedding head, rows written by hand."""
    db = str(path / "results.duckdb")
    ensure_schema(db, tables=result_tables())
    con = connect(db)
    try:
        con.execute("INSERT INTO runs (run_id, started_at, status) VALUES ('r1', now(), 'completed')")
        for head, model in (("people", "m-ner"), ("vectors", "m-emb")):
            con.execute("INSERT INTO models (model_id, head, task) VALUES (?, ?, ?)",
                        [model, head, "ner" if head == "people" else "embedding"])
            for doc in ("d1", "d2", "d3"):
                con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) VALUES (?, ?, 'f', ?, 'r1', 'done', now())", [head, doc, model])
        ents = [("d1", "PER", 0, 5), ("d1", "ORG", 10, 14), ("d2", "ORG", 0, 3), ("d2", "ORG", 20, 23)]
        for doc, group, s, e in ents:
            con.execute("INSERT INTO entities (head, doc_id, run_id, model_id, entity_group, text, start_char, "
                        "end_char, score) VALUES ('people', ?, 'r1', 'm-ner', ?, 'x', ?, ?, 0.9)", [doc, group, s, e])
        vecs = {"d1": [1.0, 0.0], "d2": [0.9, 0.1], "d3": [0.0, 1.0]}
        for doc, v in vecs.items():
            con.execute("INSERT INTO embeddings (head, doc_id, run_id, model_id, \"window\", dim, embedding, n_tokens) "
                        "VALUES ('vectors', ?, 'r1', 'm-emb', -1, 2, ?, 3)", [doc, v])
    finally:
        con.close()
    return db


def test_demo_evaluations_stored(tmp_path):
    db = _results_db(tmp_path)
    silver = {"d1": [{"start": 0, "end": 5, "label": "PER"}, {"start": 10, "end": 15, "label": "ORG"}],
              "d2": [{"start": 0, "end": 3, "label": "ORG"}],
              "d3": [{"start": 4, "end": 8, "label": "DATE"}],
              "d9": [{"start": 0, "end": 2, "label": "PER"}]}  # not processed by the head: not compared
    scores = demo.evaluate_ner_agreement(db, "people", silver)
    assert scores["ORG"]["n_gold"] == 2 and scores["ORG"]["n_pred"] == 3
    assert scores["ORG"]["f1"] == pytest.approx(0.4) and scores["PER"]["f1"] == 1.0
    assert scores["DATE"]["recall"] == 0.0 and scores["all"]["n_gold"] == 4 and scores["all"]["n_pred"] == 4
    shares = demo.evaluate_retrieval(db, "vectors", {"d1": "a", "d2": "a", "d3": "b"}, k=1)
    assert shares == {"d1": 1.0, "d2": 1.0, "d3": 0.0}
    rows = duckdb.connect(db, read_only=True).execute(
        "SELECT head, model_id, source, metric, value, n, run_id FROM evaluations ORDER BY head, metric").fetchall()
    got = {(h, m): (model, src, v, n, run) for h, model, src, m, v, n, run in rows}
    assert got[("people", "entity_f1_ORG")] == ("m-ner", "silver", pytest.approx(0.4), 3, "r1")
    assert got[("people", "entity_recall_DATE")][2] == 0.0
    assert got[("people", "pred_per_silver_ORG")][2] == pytest.approx(1.5)
    assert got[("people", "entity_f1")][2] == pytest.approx(0.5)  # 2 of 4 silver found, 2 of 4 predicted right
    assert got[("vectors", "knn1_same_topic")] == ("m-emb", "corpus", pytest.approx(2 / 3), 3, "r1")
    # evaluating again replaces the rows of that run: nothing doubles
    demo.evaluate_ner_agreement(db, "people", silver)
    n = duckdb.connect(db, read_only=True).execute("SELECT count(*) FROM evaluations").fetchone()[0]
    assert n == len(rows)


def test_demo_ner_decoding_same_in_config_and_training(tmp_path):
    """The people head's decoding params in the demo's pipeline.toml are the ones its training metric
    was decoded with (params are part of the model id), and they switch on whitespace words and the
    drops: "of", "Mr" or "-" alone are no entity (the fragments the demo showed on BBC text)."""
    import tomllib

    from pipeline.config import parse_head

    raw = tomllib.loads(demo.config(str(tmp_path)))["heads"]["people"]
    head = parse_head("people", raw, tmp_path)
    assert head.params == demo.ner_params()
    assert head.params["words"] == "whitespace" and head.params["drop_punctuation"] is True
    assert {"of", "mr", "the", "and"} <= set(head.params["stop_words"])
