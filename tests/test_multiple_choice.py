"""Tests of the multiple-choice head (heads/multiple_choice.py).

The reference calls the model in its native layout, one document at a time: the pairs of the
document's options are padded to one length and fed as [1, num_choices, seq], as the HF
multiple-choice examples do, and the logits are soft-maxed over the options. The head instead
scores single pairs ([n, 1, seq]) batched by the engine across documents.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from transformers import AutoModelForMultipleChoice, AutoTokenizer, BertConfig, BertForMultipleChoice

from heads.base import Doc
from heads.engine import pipe
from heads.multiple_choice import MultipleChoiceHead, decode_choices
from taskheads.tiny_models import base_tokenizer

ROW_KEYS = {"choice", "score", "logit", "rank", "truncated"}
MAX_LEN = 64
CONFIG_CHOICES = ["sport", "politics", "cooking"]


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BertForMultipleChoice folder; the head's copy and an independent reference copy."""
    path = tmp_path_factory.mktemp("mc64")
    torch.manual_seed(7)
    tok = base_tokenizer(MAX_LEN)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=MAX_LEN, initializer_range=0.3)
    BertForMultipleChoice(cfg).eval().save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    head_model = AutoModelForMultipleChoice.from_pretrained(str(path), use_safetensors=True).eval()
    head_tok = AutoTokenizer.from_pretrained(str(path))
    ref_model = AutoModelForMultipleChoice.from_pretrained(str(path), use_safetensors=True).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(path))
    return {"model": head_model, "tok": head_tok, "ref_model": ref_model, "ref_tok": ref_tok}


def make_head(tiny, **params) -> MultipleChoiceHead:
    return MultipleChoiceHead("mc", tiny["model"], tiny["tok"], params)


# --- the reference: native layout, one document alone ---------------------------------------
def reference(tiny, first: str, choices: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok, model = tiny["ref_tok"], tiny["ref_model"]
    enc = tok([first] * len(choices), choices, truncation="only_first", max_length=MAX_LEN,
              padding="longest", return_tensors="pt")
    inputs = {k: v.unsqueeze(0) for k, v in enc.items()}  # [1, num_choices, seq]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(choices))
    logits = logits[0].double()
    return logits.numpy(), torch.softmax(logits, -1).numpy()


def check_rows(rows: list[dict], choices: list[str], ref_logits: np.ndarray, ref_probs: np.ndarray) -> list[str]:
    assert [r["choice"] for r in rows] == choices
    for r in rows:
        assert set(r) == ROW_KEYS
        assert isinstance(r["score"], float) and isinstance(r["logit"], float)
        assert isinstance(r["rank"], int) and isinstance(r["truncated"], bool)
    scores = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(scores, ref_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose([r["logit"] for r in rows], ref_logits, atol=1e-4, rtol=0)
    assert scores.sum() == pytest.approx(1.0)
    ranking = [r["choice"] for r in sorted(rows, key=lambda r: r["rank"])]
    assert sorted(r["rank"] for r in rows) == list(range(1, len(rows) + 1))
    assert ranking == [choices[i] for i in np.argsort(-ref_probs, kind="stable")]
    return ranking


TEXTS = [
    "The striker scored twice in the final minutes and the crowd went wild.",
    "Parliament votes on the new budget today after a long debate.",
    "Simmer the onions in butter, then add garlic and a pinch of salt.",
    "A short one.",
    "Café owners in Zürich sold naïve paintings; résumé and ünïcödé test.",
    "Shares rose sharply after the quarterly results beat expectations.",
    "The minister resigned; the coach was fired; the chef opened a new restaurant.",
    "tennis football rugby cricket golf",
]
EXTRA = [None, ["economy", "sport"], "weather", None, ["travel", None, "  ", "art"], "", ["sport"],
         ["music", "music", "dance"]]


def expected_choices(extra) -> list[str]:
    if extra is None:
        extra = []
    elif isinstance(extra, str):
        extra = [extra]
    out = list(CONFIG_CHOICES)
    for e in extra:
        if e is not None and e.strip() and e.strip() not in out:
            out.append(e.strip())
    return out


# --- 1. parity with the native layout --------------------------------------------------------
def test_parity_with_native_layout_across_batches(tiny):
    head = make_head(tiny, choices=CONFIG_CHOICES, choices_column="extra")
    assert head.needed_columns() == ["extra"]
    docs = [Doc(str(i), t, {"extra": e}) for i, (t, e) in enumerate(zip(TEXTS, EXTRA))]

    batches: list[list[int]] = []
    real_forward = head.forward

    def spy(feats):
        batches.append([f.doc_index for f in feats])
        return real_forward(feats)

    head.forward = spy
    results = pipe(head, docs, token_budget=120)

    # the engine really mixed documents and split documents over batches
    assert len(batches) > 2
    assert any(len(set(b)) > 1 for b in batches)
    spread = {i: sum(1 for b in batches if i in b) for i in range(len(docs))}
    assert any(n > 1 for n in spread.values())

    rankings = []
    for r, text, extra in zip(results, TEXTS, EXTRA):
        assert r.error is None, r.error
        choices = expected_choices(extra)
        assert 3 <= len(choices) <= 5
        ref_logits, ref_probs = reference(tiny, text, choices)
        ranking = check_rows(r.rows, choices, ref_logits, ref_probs)
        assert not any(row["truncated"] for row in r.rows)
        rankings.append(tuple(c for c in ranking if c in CONFIG_CHOICES))
    assert len(set(rankings)) > 1  # the model discriminates, so the comparison can fail
    assert len({r[0] for r in rankings}) > 1


def test_prompt_template_uses_replace(tiny):
    prompt = "Topic of {text} -> {0} {}?"  # braces str.format would choke on
    head = make_head(tiny, choices=["cats", "dogs", "birds"], prompt=prompt)
    texts = ["my {cat} sleeps", "birds sing at dawn"]
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)], token_budget=64)
    for r, text in zip(results, texts):
        assert r.error is None, r.error
        ref_logits, ref_probs = reference(tiny, prompt.replace("{text}", text), ["cats", "dogs", "birds"])
        check_rows(r.rows, ["cats", "dogs", "birds"], ref_logits, ref_probs)
    # the prompt changes the input: scores differ from the bare text
    bare = pipe(make_head(tiny, choices=["cats", "dogs", "birds"]), [Doc("0", texts[0])])[0].rows
    assert any(abs(a["logit"] - b["logit"]) > 1e-4 for a, b in zip(bare, results[0].rows))


# --- 2. long documents are truncated and say so ----------------------------------------------
def test_long_document_is_truncated_and_reported(tiny):
    head = make_head(tiny, choices=CONFIG_CHOICES)
    long_text = "The referee stopped the match because of heavy rain in the stadium. " * 30
    edge = " ".join(["word"] * (MAX_LEN - 3 - 1))  # fits exactly next to a 1-token option
    texts = [TEXTS[0], long_text, TEXTS[2], edge]
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)], token_budget=256)
    for r in results:
        assert r.error is None, r.error
    assert all(row["truncated"] for row in results[1].rows)
    assert not any(row["truncated"] for row in results[0].rows + results[2].rows)
    assert not any(row["truncated"] for row in results[3].rows)  # exactly fills the window: not cut
    # on the boundary: a 2-token option costs the edge text one token, a 1-token option does not
    edge_choices = ["sport", "home cooking"]
    assert [len(tiny["tok"](c, add_special_tokens=False)["input_ids"]) for c in edge_choices] == [1, 2]
    (edge_result,) = pipe(make_head(tiny, choices=edge_choices), [Doc("edge", edge)])
    assert {row["choice"]: row["truncated"] for row in edge_result.rows} == {"sport": False, "home cooking": True}
    # the truncated document still matches the native layout (same truncation rule)
    ref_logits, ref_probs = reference(tiny, long_text, CONFIG_CHOICES)
    check_rows(results[1].rows, CONFIG_CHOICES, ref_logits, ref_probs)
    # and every pair filled the window
    feats = head.encode(Doc("x", long_text))
    assert [f.length for f in feats] == [MAX_LEN] * len(CONFIG_CHOICES)


# --- 3. parameters, choice sources and failures ----------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({}, "needs options"),
    ({"choices": []}, "needs options"),
    ({"choices": "a,b"}, "list of non-empty strings"),
    ({"choices": ["a", ""]}, "non-empty strings"),
    ({"choices": ["a", "  "]}, "non-empty strings"),
    ({"choices": ["a", 3]}, "non-empty strings"),
    ({"choices": ["a"]}, "at least 2 distinct"),
    ({"choices": ["a", " a "]}, "at least 2 distinct"),
    ({"choices": ["a", "b"], "choices_column": 5}, "choices_column"),
    ({"choices": ["a", "b"], "choices_column": ""}, "choices_column"),
    ({"choices": ["a", "b"], "prompt": "Question: which topic?"}, "{text}"),
    ({"choices": ["a", "b"], "prompt": None}, "prompt: expected a string"),
    ({"choices": ["a", "b"], "prompt": 3}, "prompt: expected a string"),
])
def test_validate_params_errors(params, message):
    with pytest.raises(ValueError) as info:
        MultipleChoiceHead.validate_params({**MultipleChoiceHead.params, **params})
    assert message in str(info.value)


@pytest.mark.parametrize("params", [
    {"choices": ["a", "b"]},
    {"choices_column": "opts"},
    {"choices": ["a"], "choices_column": "opts"},
    {"choices": ["a", "b"], "prompt": "Review: {text}"},
])
def test_validate_params_accepts(params):
    MultipleChoiceHead.validate_params({**MultipleChoiceHead.params, **params})


def test_construction_validates_and_checks_config_choices(tiny):
    with pytest.raises(ValueError, match="needs options"):
        make_head(tiny)
    with pytest.raises(ValueError, match="no room for the text"):
        make_head(tiny, choices=["ok", "word " * MAX_LEN])
    assert make_head(tiny, choices=["a", "b"]).needed_columns() == []


def test_choices_from_column_list_string_and_none(tiny):
    head = make_head(tiny, choices=["yes", "no"], choices_column="opts")
    docs = [
        Doc("list", "Is it raining?", {"opts": ["maybe", "yes", None, "  ", " later "]}),
        Doc("string", "Is it raining?", {"opts": "maybe"}),
        Doc("none", "Is it raining?", {"opts": None}),
        Doc("nan", "Is it raining?", {"opts": float("nan")}),
        Doc("tuple", "Is it raining?", {"opts": ("no", "never")}),
    ]
    results = pipe(head, docs, token_budget=64)
    got = {r.doc.doc_id: [row["choice"] for row in r.rows] for r in results}
    assert all(r.error is None for r in results), [r.error for r in results]
    assert got == {"list": ["yes", "no", "maybe", "later"], "string": ["yes", "no", "maybe"],
                   "none": ["yes", "no"], "nan": ["yes", "no"], "tuple": ["yes", "no", "never"]}
    # a document's scores depend only on itself: "yes"/"no" keep their logits whatever else is offered
    for r in results:
        logits = {row["choice"]: row["logit"] for row in r.rows}
        assert logits["yes"] == pytest.approx(got_logit(results, "none", "yes"), abs=1e-4)


def got_logit(results, doc_id: str, choice: str) -> float:
    (r,) = [r for r in results if r.doc.doc_id == doc_id]
    return next(row["logit"] for row in r.rows if row["choice"] == choice)


def test_too_few_choices_fail_at_encode(tiny):
    head = make_head(tiny, choices_column="opts")
    docs = [
        Doc("one", "some text", {"opts": ["only"]}),
        Doc("dupes", "some text", {"opts": ["same", " same", None]}),
        Doc("none", "some text", {"opts": None}),
        Doc("missing", "some text", {}),
        Doc("bad", "some text", {"opts": [1, 2]}),
        Doc("ok", "some text", {"opts": ["left", "right"]}),
        Doc("long", "some text", {"opts": ["short", "word " * MAX_LEN]}),
    ]
    results = {r.doc.doc_id: r for r in pipe(head, docs, token_budget=64)}
    for doc_id in ("one", "dupes", "none"):
        r = results[doc_id]
        assert r.stage == "encode" and r.rows == []
        assert "fewer than 2 choices" in r.error and "TooFewChoicesError" in r.error
    assert "1:" in results["one"].error and "0:" in results["none"].error
    assert results["missing"].stage == "encode" and "missing" in results["missing"].error
    assert results["bad"].stage == "encode" and "int" in results["bad"].error
    assert results["long"].stage == "encode" and "no room for the text" in results["long"].error
    ok = results["ok"]
    assert ok.error is None and [row["choice"] for row in ok.rows] == ["left", "right"]


def test_decode_choices_pure():
    rows = decode_choices(["a", "b", "c"], [0.0, 2.0, 0.0], [False, True, False])
    probs = np.exp([0.0, 2.0, 0.0]) / np.exp([0.0, 2.0, 0.0]).sum()
    assert [r["rank"] for r in rows] == [2, 1, 3]  # ties keep option order
    assert [r["score"] for r in rows] == pytest.approx(list(probs))
    assert [r["truncated"] for r in rows] == [False, True, False]
    with pytest.raises(ValueError):
        decode_choices(["a"], [1.0, 2.0], [False])
    with pytest.raises(ValueError):
        decode_choices(["a", "b"], [float("nan"), 1.0], [False, False])
