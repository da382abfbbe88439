"""Classification head against one-document-at-a-time model outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from heads.base import Doc, softmax
from heads.classification import decode_classification
from heads.engine import pipe
from heads.loading import load_head

TEXTS = [
    "Shares rose sharply after the quarterly results.",
    "The striker scored twice in the final minutes!",
    "Parliament votes on the new budget today.",
    "A short one.",
    "Café owners in Zürich — naïve résumé test, ünïcödé.",
    "word " * 40,
    "Long document. " * 120,  # several windows of a 64-token model
]


@pytest.fixture(scope="module")
def reference(tiny_models):
    path = tiny_models["classification"]
    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _window_logits(model, tok, text, window, stride):
    enc = tok(text, truncation=True, max_length=window, stride=stride, return_overflowing_tokens=True)
    out = []
    for ids, types in zip(enc["input_ids"], enc["token_type_ids"]):
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0].numpy())
    return np.stack(out)


def test_matches_single_document_reference(tiny_models, reference):
    model, tok = reference
    head = load_head("topic", "classification", tiny_models["classification"])
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(TEXTS)], token_budget=128)
    labels = []
    for r, text in zip(results, TEXTS):
        assert r.error is None
        (row,) = r.rows
        logits = _window_logits(model, tok, text, 64, 32)
        probs = softmax(logits).mean(axis=0)
        assert row["n_chunks"] == len(logits)
        assert row["label"] == model.config.id2label[int(probs.argmax())]
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert sum(row["scores"].values()) == pytest.approx(1.0)
        labels.append(row["label"])
    assert results[-1].rows[0]["n_chunks"] > 2  # long text was windowed, not truncated
    assert results[0].rows[0]["n_chunks"] == 1
    assert len(set(labels)) > 1  # the model discriminates, so the comparison means something


def test_truncate_mode_keeps_first_window(tiny_models, reference):
    model, tok = reference
    head = load_head("topic", "classification", tiny_models["classification"], params={"long_text": "truncate"})
    (r,) = pipe(head, [Doc("long", TEXTS[-1])])
    enc = tok(TEXTS[-1], truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0], -1).numpy()
    assert r.rows[0]["n_chunks"] == 1 and r.rows[0]["long_text"] == "truncate"
    assert r.rows[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_decode_averages_window_probabilities():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    row = decode_classification(logits, ["a", "b"])
    expected = (softmax(logits[0]) + softmax(logits[1])) / 2
    assert row["label"] == "a" and row["score"] == pytest.approx(expected[0])
    assert row["n_chunks"] == 2
    multi = decode_classification(np.array([[3.0, -3.0]]), ["x", "y"], multi_label=True)
    assert multi["scores"]["x"] == pytest.approx(1 / (1 + np.exp(-3.0)))
