"""Tests of the question-answering head (heads/qa.py).

The reference answers are computed independently of the head: the tokenizer and the model are
called directly, one (question, window) at a time without padding, and every (start, end) pair of
context tokens is scored in a brute-force loop with the HF pipeline's rules.
"""
from __future__ import annotations

import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from heads.base import Doc, DocumentError
from heads.engine import pipe
from heads.loading import load_head
from heads.qa import QuestionAnsweringHead, decode_answer
from taskheads.tiny_models import build_bert

ROW_KEYS = {"question", "answer", "start_char", "end_char", "score", "n_windows"}


# --- fixtures -------------------------------------------------------------------------------
class Tiny:
    """A tiny QA model folder, the head's copy (via load_head) and an independent reference copy."""

    def __init__(self, path, **params):
        self.path = path
        self.head = load_head("qa-test", "qa", str(path), params=params, device="cpu")
        self.ref_model = AutoModelForQuestionAnswering.from_pretrained(str(path)).eval()
        self.ref_tok = AutoTokenizer.from_pretrained(str(path))

    def head_with(self, **params) -> QuestionAnsweringHead:
        return QuestionAnsweringHead("qa-test", self.head.model, self.head.tokenizer, params)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = build_bert(tmp_path_factory.mktemp("qa128"), "qa", max_len=128, seed=1)
    return Tiny(path, questions=["who founded the company?"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = build_bert(tmp_path_factory.mktemp("qa64"), "qa", max_len=64, seed=2)
    return Tiny(path, questions=["what is it?"], doc_stride=16)


# --- the independent reference --------------------------------------------------------------
def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    z = sum(ex)
    return [e / z for e in ex]


def reference(tiny: Tiny, text: str, question: str, max_seq_len: int, stride: int, max_answer_len: int,
              allow_no_answer: bool = False) -> dict:
    tok, model = tiny.ref_tok, tiny.ref_model
    enc = tok(question, text, truncation="only_second", max_length=max_seq_len, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    best = None  # (score, start_char, end_char, window)
    null = math.inf
    first_window_end = None
    for k in range(n):
        ids = enc["input_ids"][k]
        assert ids[0] == tok.cls_token_id
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([enc["token_type_ids"][k]]))
        start, end = out.start_logits[0].tolist(), out.end_logits[0].tolist()
        context = [i for i, s in enumerate(enc.sequence_ids(k)) if s == 1]
        offsets = enc["offset_mapping"][k]
        if k == 0:
            first_window_end = offsets[context[-1]][1]
        keep = set(context) | {0}
        ps = _softmax([start[i] if i in keep else -10000.0 for i in range(len(ids))])
        pe = _softmax([end[i] if i in keep else -10000.0 for i in range(len(ids))])
        null = min(null, ps[0] * pe[0])
        for s in context:
            for e in context:
                if s <= e < s + max_answer_len:
                    score = ps[s] * pe[e]
                    if best is None or score > best[0]:
                        best = (score, offsets[s][0], offsets[e][1], k)
    ref = {"n_windows": n, "null": null, "first_window_end": first_window_end, "window": best[3]}
    if allow_no_answer and null > best[0]:
        ref.update(start_char=None, end_char=None, score=null, answer=None)
    else:
        ref.update(start_char=best[1], end_char=best[2], score=best[0], answer=text[best[1]:best[2]])
    return ref


def assert_matches(row: dict, ref: dict, text: str) -> None:
    assert set(row) == ROW_KEYS
    assert (row["start_char"], row["end_char"]) == (ref["start_char"], ref["end_char"])
    assert row["n_windows"] == ref["n_windows"]
    assert abs(row["score"] - ref["score"]) < 1e-5
    assert abs(row["score"] - ref["score"]) <= 1e-4 * ref["score"]  # relative too: scores are small
    if row["answer"] is None:
        assert row["start_char"] is None and row["end_char"] is None
    else:
        assert row["answer"] == text[row["start_char"]:row["end_char"]] == ref["answer"]


WORDS = ("the company was founded in 1999 by Ada Lovelace and Grace Hopper near the old harbour of "
         "Zürich , where café owners sold naïve paintings ; revenue grew 12.5 % each year until the "
         "merger with Initech ( a rival ) closed . engineers shipped compilers , databases and tiny "
         "transformer models to customers in Tokyo , Lagos and São Paulo").split()


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# --- 1. reference parity through the engine -------------------------------------------------
@pytest.mark.parametrize("allow_no_answer", [False, True])
def test_parity_with_unbatched_bruteforce_reference(big, allow_no_answer):
    params = dict(questions=["who founded the company?"], question_column="question", max_seq_len=96,
                  doc_stride=32, max_answer_len=6, allow_no_answer=allow_no_answer)
    head = big.head_with(**params)
    assert head.needed_columns() == ["question"]
    rng = random.Random(7)
    column_questions = ["where was it founded?", "how much did revenue grow?", "who merged with initech?",
                        "what did engineers ship?", "when was it founded?", "which cities?",
                        "what was sold?", "who is grace hopper?"]
    docs = [Doc(f"d{i}", make_text(rng, n), {"question": q})
            for i, (n, q) in enumerate(zip([4, 15, 30, 55, 80, 110, 150, 200], column_questions))]

    batches = []
    forward = head.forward

    def recording_forward(feats):
        batches.append([(f.doc_index, f.length) for f in feats])
        return forward(feats)

    head.forward = recording_forward
    results = pipe(head, docs, token_budget=500)

    # the engine really mixed documents and lengths in its batches
    assert len(batches) > 1
    assert any(len({d for d, _ in b}) > 1 for b in batches)
    assert any(len({n for _, n in b}) > 1 for b in batches)
    assert all(n <= 96 for b in batches for _, n in b)

    multi_window = 0
    answered = unanswered = 0
    for doc, res in zip(docs, results):
        assert res.error is None, res.error
        assert [r["question"] for r in res.rows] == ["who founded the company?", doc.fields["question"]]
        answered += sum(r["answer"] is not None for r in res.rows)
        unanswered += sum(r["answer"] is None for r in res.rows)
        for row in res.rows:
            ref = reference(big, doc.text, row["question"], 96, 32, 6, allow_no_answer)
            assert_matches(row, ref, doc.text)
            multi_window += row["n_windows"] > 1
    assert multi_window >= 4
    assert answered > 0
    if allow_no_answer:
        assert unanswered > 0  # both branches of the null-score rule are exercised
    else:
        assert unanswered == 0


# --- 2. long documents, small model window --------------------------------------------------
def test_long_documents_best_span_from_any_window(small):
    questions = ["what is it?", "who founded the company in zurich?"]
    head = small.head_with(questions=questions, doc_stride=16)  # max_seq_len 384 -> capped to 64
    assert head.max_seq_len == 64
    rng = random.Random(3)
    docs = [Doc(f"long{i}", make_text(rng, n)) for i, n in enumerate([120, 160, 200, 240, 300, 350])]
    feats = [f for d in docs for f in head.encode(d)]
    assert max(f.length for f in feats) == 64
    results = pipe(head, docs, token_budget=64 * 6)

    later_window = 0
    for doc, res in zip(docs, results):
        assert res.error is None, res.error
        assert [r["question"] for r in res.rows] == questions
        for row in res.rows:
            ref = reference(small, doc.text, row["question"], 64, 16, 15)
            assert_matches(row, ref, doc.text)
            assert row["n_windows"] > 1
            assert row["answer"] == doc.text[row["start_char"]:row["end_char"]]
            assert len(small.ref_tok(row["answer"], add_special_tokens=False)["input_ids"]) <= 15
            if row["start_char"] >= ref["first_window_end"]:  # beyond what the first window sees
                later_window += 1
    assert later_window >= 2


def test_long_question_keeps_all_tokens_and_narrows_stride(small):
    question = " ".join(["which"] * 50) + "?"  # 51 tokens: 64 - 3 - 51 = 10 context tokens per window
    head = small.head_with(questions=[question], doc_stride=16, max_question_len=20)
    text = make_text(random.Random(5), 60)
    res = pipe(head, [Doc("q", text)])[0]
    assert res.error is None, res.error
    (row,) = res.rows
    assert row["question"] == question
    ref = reference(small, text, question, 64, 10 // 2, 15)  # stride narrowed to half the room
    assert_matches(row, ref, text)
    assert row["n_windows"] > 5


def test_question_leaving_no_room_fails_only_its_document(small):
    head = small.head_with(question_column="q", doc_stride=16)
    too_long = " ".join(["why"] * 70)
    docs = [Doc("ok", "grace hopper wrote compilers", {"q": "who wrote compilers?"}),
            Doc("bad", "grace hopper wrote compilers", {"q": too_long})]
    ok, bad = pipe(head, docs)
    assert ok.error is None and len(ok.rows) == 1
    assert bad.rows == [] and bad.stage == "encode"
    assert "QuestionTooLongError" in bad.error and "leaves no room for context" in bad.error
    assert "max_question_len=64" in bad.error
    with pytest.raises(ValueError, match="leaves no room"):
        head.encode(docs[1])
    with pytest.raises(DocumentError):
        head.encode(docs[1])


# --- 3. the pure decoder with hand-made logits ----------------------------------------------
TEXT = "alpha beta gamma delta epsilon zeta"
# [CLS] q1 q2 [SEP] alpha beta gamma delta epsilon zeta [SEP]
CONTEXT = [False] * 4 + [True] * 6 + [False]
OFFSETS = [(0, 0), (0, 3), (4, 6), (0, 0), (0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (31, 35), (0, 0)]


def logits(cls=0.0, **tokens):
    """11 logits: `cls`, q1/q2 very high (must be masked), the named context words, else 0."""
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    out = np.zeros(11, dtype=np.float32)
    out[0] = cls
    out[1] = out[2] = 20.0
    out[10] = 15.0
    for name, value in tokens.items():
        out[4 + names.index(name)] = value
    return out


def decode(starts, ends, max_answer_len=15, allow=False, offsets=None):
    n = len(starts)
    return decode_answer(TEXT, "q?", starts, ends, [CONTEXT] * n, offsets or [OFFSETS] * n,
                         max_answer_len=max_answer_len, allow_no_answer=allow)


def test_decode_max_answer_len_respected():
    start = logits(alpha=6.0, delta=3.0)
    end = logits(alpha=-1.0, beta=1.0, epsilon=2.0, zeta=6.0)
    assert decode([start], [end], max_answer_len=6)["answer"] == "alpha beta gamma delta epsilon zeta"
    # logit sums: (alpha, zeta) 12 > (delta, zeta) 9 > (alpha, epsilon) 8 > (alpha, beta) 7 > (zeta, zeta) 6
    assert decode([start], [end], max_answer_len=5)["answer"] == "delta epsilon zeta"
    assert decode([start], [end], max_answer_len=3)["answer"] == "delta epsilon zeta"
    assert decode([start], [end], max_answer_len=2)["answer"] == "alpha beta"
    row = decode([start], [end], max_answer_len=1)
    assert row["answer"] == "zeta" and (row["start_char"], row["end_char"]) == (31, 35)
    # the score is p_start * p_end with softmaxes over context + CLS (question tokens masked)
    keep = np.array([True] + [False] * 3 + [True] * 6 + [False])
    ps = np.exp(np.where(keep, start, -10000.0).astype(np.float64))
    pe = np.exp(np.where(keep, end, -10000.0).astype(np.float64))
    ps, pe = ps / ps.sum(), pe / pe.sum()
    assert row["score"] == pytest.approx(ps[9] * pe[9], rel=1e-12)
    for n in range(1, 7):
        r = decode([start], [end], max_answer_len=n)
        assert len(r["answer"].split()) <= n


def test_decode_allow_no_answer():
    start, end = logits(cls=8.0, beta=2.0), logits(cls=8.0, gamma=2.0)
    keep = np.array([True] + [False] * 3 + [True] * 6 + [False])
    ps = np.exp(np.where(keep, start, -10000.0).astype(np.float64))
    pe = np.exp(np.where(keep, end, -10000.0).astype(np.float64))
    ps, pe = ps / ps.sum(), pe / pe.sum()
    null, span = ps[0] * pe[0], ps[5] * pe[6]
    assert null > span

    off = decode([start], [end], allow=False)
    assert (off["answer"], off["start_char"], off["end_char"]) == ("beta gamma", 6, 16)
    assert off["score"] == pytest.approx(span, rel=1e-12)  # CLS zeroed, NOT renormalised

    on = decode([start], [end], allow=True)
    assert on == {"question": "q?", "answer": None, "start_char": None, "end_char": None,
                  "score": pytest.approx(null, rel=1e-12), "n_windows": 1}

    # a weak CLS: the span wins even when no-answer is allowed
    low = decode([logits(cls=-5.0, beta=2.0)], [logits(cls=-5.0, gamma=2.0)], allow=True)
    assert low["answer"] == "beta gamma"

    # close to the boundary: null ~ exp(2 cls), span ~ exp(2 + 2), same softmax denominators
    below = decode([logits(cls=1.99, beta=2.0)], [logits(cls=1.99, gamma=2.0)], allow=True)
    assert below["answer"] == "beta gamma"
    above = decode([logits(cls=2.01, beta=2.0)], [logits(cls=2.01, gamma=2.0)], allow=True)
    assert above["answer"] is None and above["score"] > below["score"]


def test_decode_windows_min_null_and_best_window():
    text_offsets_b = [(o[0] + 100, o[1] + 100) if c else o for o, c in zip(OFFSETS, CONTEXT)]
    text = TEXT + " " * (100 - len(TEXT)) + TEXT
    a_start, a_end = logits(cls=8.0, alpha=1.0), logits(cls=8.0, alpha=1.0)
    b_start, b_end = logits(cls=-3.0, delta=5.0), logits(cls=-3.0, epsilon=5.0)
    kw = dict(context_masks=[CONTEXT, CONTEXT], offsets=[OFFSETS, text_offsets_b], max_answer_len=15)
    row = decode_answer(text, "q?", [a_start, b_start], [a_end, b_end], allow_no_answer=True, **kw)
    assert (row["answer"], row["start_char"], row["end_char"]) == ("delta epsilon", 117, 130)
    assert row["n_windows"] == 2
    # the null score is the minimum over windows: here window b's, far below its span
    nul = decode_answer(text, "q?", [a_start, a_start], [a_end, a_end], allow_no_answer=True, **kw)
    assert nul["answer"] is None and nul["n_windows"] == 2
    # identical windows: the earlier one wins the tie
    tie = decode_answer(text, "q?", [b_start, b_start], [b_end, b_end], **kw)
    assert (tie["start_char"], tie["end_char"]) == (17, 30)


def test_decode_without_context_tokens():
    no_ctx = [[False] * 11]
    with pytest.raises(ValueError, match="no context token"):
        decode_answer(TEXT, "q?", [logits()], [logits()], no_ctx, [OFFSETS], allow_no_answer=False)
    row = decode_answer(TEXT, "q?", [logits()], [logits()], no_ctx, [OFFSETS], allow_no_answer=True)
    assert row["answer"] is None and row["score"] > 0


# --- 4. property test: arbitrary unicode contexts -------------------------------------------
PIECES = ["😀", "👩‍👩‍👧", "🇫🇷", "שלום עולם", "مرحبا", "e\u0301", "a\u0308\u0301", "   ", "\t\n\t  ",
          "\u00a0\u3000", "\u200b", "東京タワー", "naïve", "Ǆ", "ﬁne", "İstanbul", "word", "x", "12.5%",
          "\u202e", "\ufe0f", "[CLS]", "ß", "Ⅻ"]
contexts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), min_size=8, max_size=60).map("".join)


@settings(max_examples=30, deadline=None, database=None)
@given(text=contexts)
def test_offsets_slice_the_original_text(small, text):
    # 16-token windows (9 context tokens, stride 4) so that many contexts span several windows
    head = small.head_with(questions=["what is it?"], max_seq_len=16, doc_stride=4, max_answer_len=8)
    res = pipe(head, [Doc("u", text)], token_budget=100)[0]
    if not text.strip():
        assert res.stage == "encode" and "empty text" in res.error
        return
    if small.ref_tok(text, add_special_tokens=False)["input_ids"] == []:
        assert res.stage == "encode" and "no tokens" in res.error
        return
    assert res.error is None, res.error
    (row,) = res.rows
    s, e = row["start_char"], row["end_char"]
    assert 0 <= s < e <= len(text)
    assert row["answer"] == text[s:e]
    assert 0.0 < row["score"] <= 1.0
    assert_matches(row, reference(small, text, "what is it?", 16, 4, 8), text)


# --- configuration and question sources -----------------------------------------------------
def test_registry_and_attributes(big):
    assert isinstance(big.head, QuestionAnsweringHead)
    assert (big.head.task, big.head.table) == ("qa", "answers")
    assert big.head.model_class is AutoModelForQuestionAnswering
    assert big.head.max_seq_len == 128  # 384 capped to the model's 128
    assert big.head.needed_columns() == []


def test_defaults_on_a_model_shorter_than_the_stride(big):
    # defaults (max_seq_len 384, doc_stride 128) on a 128-token model: the window is capped to 128
    # and the stride, which no longer fits, is narrowed to half the room left by the question
    head = big.head  # built by load_head with only `questions` set
    question = "who founded the company?"
    text = make_text(random.Random(13), 250)
    res = pipe(head, [Doc("d", text)])[0]
    assert res.error is None, res.error
    (row,) = res.rows
    n_question = len(big.ref_tok(question, add_special_tokens=False)["input_ids"])
    room = 128 - 3 - n_question
    assert_matches(row, reference(big, text, question, 128, room // 2, 15), text)
    assert row["n_windows"] > 3


@pytest.mark.parametrize("params, message", [
    ({"questions": []}, "needs questions"),
    ({"questions": None}, "needs questions"),
    ({"questions": "who?"}, "list of non-empty strings"),
    ({"questions": ["who?", "  "]}, "non-empty strings"),
    ({"question_column": 3}, "question_column"),
    ({"max_seq_len": 0}, "max_seq_len: expected an integer >= 1"),
    ({"doc_stride": -4}, "doc_stride: expected an integer >= 1"),
    ({"max_answer_len": True}, "max_answer_len: expected an integer >= 1"),
    ({"max_question_len": "64"}, "max_question_len: expected an integer >= 1"),
    ({"doc_stride": 100, "max_seq_len": 100}, "doc_stride .100. must be smaller than max_seq_len .100."),
    ({"allow_no_answer": "yes"}, "allow_no_answer"),
    ({"questions": ["why " * 130]}, "question of 130 tokens .more than max_question_len=64. leaves no room"),
])
def test_setup_rejects_bad_params(big, params, message):
    full = {"questions": ["who?"], **params}
    with pytest.raises(ValueError, match=message):
        big.head_with(**full)


def test_question_sources(small):
    head = small.head_with(question_column="q", doc_stride=16)
    text = "grace hopper wrote compilers in 1952"
    docs = [
        Doc("none", text, {"q": None}),
        Doc("nan", text, {"q": float("nan")}),
        Doc("blank", text, {"q": "   "}),
        Doc("empty-list", text, {"q": []}),
        Doc("list", text, {"q": ["who wrote compilers?", None, "", " when? ", "who wrote compilers?"]}),
        Doc("array", text, {"q": np.array(["who?"], dtype=object)}),
        Doc("missing", text, {}),
        Doc("int", text, {"q": 7}),
        Doc("empty-text-no-question", "", {"q": None}),
    ]
    res = {r.doc.doc_id: r for r in pipe(head, docs)}
    for doc_id in ("none", "nan", "blank", "empty-list", "empty-text-no-question"):
        assert res[doc_id].error is None and res[doc_id].rows == []
        assert head.encode(docs[[d.doc_id for d in docs].index(doc_id)]) == []
    assert [r["question"] for r in res["list"].rows] == ["who wrote compilers?", "when?"]
    assert [r["question"] for r in res["array"].rows] == ["who?"]
    assert "missing" in res["missing"].error and res["missing"].stage == "encode"
    assert "expected a string or a list of strings" in res["int"].error

    both = small.head_with(questions=["who?"], question_column="q", doc_stride=16)
    rows = pipe(both, [Doc("d", text, {"q": ["who?", "what?"]})])[0].rows
    assert [r["question"] for r in rows] == ["who?", "what?"]  # config first, repeats dropped


def test_empty_or_tokenless_text_fails_with_reason(small):
    head = small.head_with(questions=["what?"], doc_stride=16)
    empty, tokenless, ok = pipe(head, [Doc("e", " \n\t"), Doc("t", "\u200b\u0301"), Doc("ok", "hello")])
    assert empty.stage == "encode" and "empty text" in empty.error
    assert tokenless.stage == "encode" and "no tokens" in tokenless.error
    assert ok.error is None and ok.rows[0]["answer"] == "hello"


def test_features_carry_question_window_and_context(small):
    head = small.head_with(questions=["what is it?", "who?"], doc_stride=16)
    text = make_text(random.Random(11), 90)
    feats = head.encode(Doc("f", text))
    assert {f.meta["question"] for f in feats} == {0, 1}
    for f in feats:
        assert f.length <= 64 and len(f.token_type_ids) == f.length
        assert f.input_ids[0] == small.ref_tok.cls_token_id and f.meta["cls_index"] == 0
        ctx = [i for i, c in enumerate(f.meta["context_mask"]) if c]
        assert ctx and all(f.token_type_ids[i] == 1 for i in ctx)
        assert all(0 <= f.meta["offsets"][i][0] < f.meta["offsets"][i][1] <= len(text) for i in ctx)
    outs = head.forward(feats)
    assert all(o[0].shape == o[1].shape == (f.length,) for f, o in zip(feats, outs))
