"""Training: tiny BERT bases learn toy tasks; saved folders load as heads; pure target/metric parts."""
from __future__ import annotations

import random

import pytest

from heads.base import Doc
from heads.engine import pipe
from heads.loading import load_head
from taskheads.tiny_models import base_tokenizer, build_bert
from training import train_classifier, train_qa, train_token_classifier
from training.heads import answer_positions, bio_labels, bio_tags, evaluate_token_classifier
from core.metrics import entity_prf, exact_match, macro_f1, normalize_answer, token_f1

PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"]
PLACES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Oslo", "Vienna", "Dublin"]
FILLER = ["today", "again", "quickly", "at noon", "with friends", "in the morning", "for fun", "once more"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny random BERT encoder standing in for a pretrained base (its task layer is replaced)."""
    return str(build_bert(tmp_path_factory.mktemp("base") / "bert", "masked_lm", max_len=128, seed=1, hidden=32))


# --- toy data: trivially learnable, seeded -----------------------------------------------------

def topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            text, label = f"{rng.choice(PEOPLE)} ate an apple {rng.choice(FILLER)}", "fruit"
        else:
            text, label = f"{rng.choice(PEOPLE)} watched the rocket launch {rng.choice(FILLER)}", "space"
        rows.append({"text": text, "label": label})
    return rows


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        if rng.random() < 0.5:
            text = f"{person} visited {place} {rng.choice(FILLER)}."
            p0, l0 = 0, text.index(place)
        else:
            text = f"Yesterday in {place} we met {person}."
            l0, p0 = text.index(place), text.index(person)
        rows.append({"text": text, "entities": [{"start": p0, "end": p0 + len(person), "label": "PER"},
                                                {"start": l0, "end": l0 + len(place), "label": "LOC"}]})
    return rows


def qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        context = f"{person} lives in {place}. {person} likes tea {rng.choice(FILLER)}."
        rows.append({"context": context, "question": f"Where does {person} live?",
                     "answer_start": context.index(place), "answer_text": place})
    return rows


# --- training on tiny bases ---------------------------------------------------------------------

def test_classifier_learns_and_reloads(base, tmp_path):
    out = str(tmp_path / "topic")
    held_out = topic_rows(40, seed=2)
    metrics = train_classifier(base, out, topic_rows(200, seed=1), held_out, epochs=3, lr=1e-3,
                               batch_size=16, max_length=64, progress=False)
    assert metrics["accuracy"] >= 0.9 and metrics["macro_f1"] >= 0.9, metrics
    head = load_head("topic", "classification", out)
    assert head.model.config.id2label == {0: "fruit", 1: "space"}
    results = pipe(head, [Doc(str(i), r["text"]) for i, r in enumerate(held_out)])
    pred = [r.rows[0]["label"] for r in results]
    assert sum(p == r["label"] for p, r in zip(pred, held_out)) / len(held_out) == metrics["accuracy"]


def test_token_classifier_learns_and_reloads(base, tmp_path):
    out = str(tmp_path / "ner")
    held_out = ner_rows(40, seed=4)
    metrics = train_token_classifier(base, out, ner_rows(300, seed=3), held_out, epochs=4, lr=2e-3,
                                     batch_size=16, progress=False)
    assert metrics["entity_f1"] >= 0.8, metrics
    head = load_head("ner", "ner", out)
    assert head.model.config.id2label == dict(enumerate(["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]))
    results = pipe(head, [Doc(str(i), r["text"]) for i, r in enumerate(held_out)])
    pred = [{(e["start_char"], e["end_char"], e["entity_group"]) for e in r.rows} for r in results]
    gold = [{(e["start"], e["end"], e["label"]) for e in r["entities"]} for r in held_out]
    assert entity_prf(gold, pred)["f1"] == pytest.approx(metrics["entity_f1"])
    # the held-out metric decodes with the head params it is given: every name a stop word, no entity
    names = [w.lower() for w in PEOPLE + PLACES]
    assert evaluate_token_classifier(out, held_out, params={"stop_words": names})["entity_f1"] == 0.0


def test_qa_learns_and_reloads(base, tmp_path):
    out = str(tmp_path / "qa")
    held_out = qa_rows(40, seed=6)
    metrics = train_qa(base, out, qa_rows(300, seed=5), held_out, epochs=4, lr=2e-3, batch_size=16,
                       progress=False)
    assert metrics["exact_match"] >= 0.8 and metrics["f1"] >= metrics["exact_match"], metrics
    head = load_head("qa", "qa", out, params={"question_column": "question"})
    results = pipe(head, [Doc(str(i), r["context"], {"question": r["question"]}) for i, r in enumerate(held_out)])
    em = sum(exact_match(r["answer_text"], res.rows[0]["answer"]) for r, res in zip(held_out, results))
    assert em / len(held_out) == pytest.approx(metrics["exact_match"])


# --- pure parts --------------------------------------------------------------------------------

def test_bio_tags_from_character_spans():
    tok = base_tokenizer()
    text = "Johanssonberg met Ann Lee in New York."
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    tags = bio_tags(enc["offset_mapping"], enc["special_tokens_mask"],
                    [{"start": 0, "end": 13, "label": "PER"}, {"start": 18, "end": 25, "label": "PER"},
                     {"start": 29, "end": 37, "label": "LOC"}])
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    by_token = list(zip(tokens, tags))
    assert by_token[0] == ("[CLS]", None) and by_token[-1] == ("[SEP]", None)
    first_word = [t for tkn, t in by_token[1:] if tkn.startswith("##") or tkn == "johan"]
    assert tags[1] == "B-PER" and all(t == "I-PER" for t in tags[2:1 + len(tok.tokenize("Johanssonberg"))])
    assert first_word  # the surname is split into subwords, all tagged
    words = {tkn: t for tkn, t in by_token}
    assert words["met"] == "O" and words["ann"] == "B-PER" and words["lee"] == "I-PER"
    assert words["new"] == "B-LOC" and words["york"] == "I-LOC" and words["."] == "O"


def test_bio_tags_adjacent_entities_restart_with_b():
    offsets = [(0, 0), (0, 3), (4, 7), (0, 0)]
    entities = [{"start": 0, "end": 3, "label": "PER"}, {"start": 4, "end": 7, "label": "PER"}]
    assert bio_tags(offsets, [1, 0, 0, 1], entities) == [None, "B-PER", "B-PER", None]
    assert bio_labels(["PER", "LOC", "PER"]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_answer_positions_inside_and_outside_the_window():
    offsets = [(0, 0), (0, 5), (0, 0), (0, 4), (5, 7), (8, 13), (0, 0)]
    seq = [None, 0, None, 1, 1, 1, None]
    assert answer_positions(offsets, seq, 5, 13) == (4, 5)
    assert answer_positions(offsets, seq, 6, 7) == (4, 4)  # inside a token: that token
    assert answer_positions(offsets, seq, 20, 25) == (0, 0)  # not in this window: CLS


def test_entity_prf_exact_span_and_type():
    gold = [{(0, 5, "PER"), (10, 15, "LOC")}, {(3, 7, "ORG")}]
    pred = [{(0, 5, "PER"), (10, 14, "LOC")}, {(3, 7, "PER"), (20, 22, "ORG")}]
    scores = entity_prf(gold, pred)
    assert scores["precision"] == pytest.approx(1 / 4)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert entity_prf([set()], [set()])["f1"] == 0.0


def test_squad_normalisation_em_and_f1():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Eiffel Tower", "Eiffel Tower.") == 1.0
    assert exact_match("Paris", None) == 0.0
    assert token_f1("the big red dog", "a red dog barked") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("", "") == 1.0 and token_f1("the", "x") == 0.0


def test_macro_f1_averages_labels():
    assert macro_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx((2 / 3 + 2 / 3) / 2)


# --- the flow ------------------------------------------------------------------------------------

def test_train_head_flow_records_evaluations(prefect_harness, base, tmp_path):
    from flows.train_head import train_head
    from storage.db import query
    from storage.training_data import read_rows, write_rows

    train_path = write_rows(str(tmp_path / "train.parquet"), ner_rows(300, seed=3))
    eval_path = write_rows(str(tmp_path / "eval.parquet"), ner_rows(30, seed=4))
    assert read_rows(eval_path)[0]["entities"] == ner_rows(30, seed=4)[0]["entities"]
    database = str(tmp_path / "results.duckdb")
    # the corpus config's head params decode the held-out rows: every person's name a stop word
    params = {"aggregation": "first", "stop_words": [p.lower() for p in PEOPLE]}
    metrics = train_head("ner", base, str(tmp_path / "ner"), train_path, eval_path, database=database,
                         head="people", epochs=4, lr=2e-3, progress=False, head_params=params)
    cols, rows = query(database, "SELECT head, model_id, metric, value, n, source, run_id FROM evaluations "
                                 "ORDER BY metric")
    got = [dict(zip(cols, r)) for r in rows]
    assert [r["metric"] for r in got] == ["entity_f1", "entity_precision", "entity_recall"]
    assert all(r["head"] == "people" and r["source"] == "training" and r["n"] == 30 for r in got)
    assert all(r["model_id"] == metrics["model_id"] and r["run_id"] == metrics["run_id"] for r in got)
    assert got[0]["value"] == pytest.approx(metrics["entity_f1"])
    # every row has one person and one place: places found, no person emitted
    assert metrics["entity_precision"] >= 0.8 and metrics["entity_recall"] <= 0.5, metrics
