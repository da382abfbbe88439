"""MaskedLMHead: fill-mask and pseudo-perplexity parity with unbatched model calls, long documents
predicted from their most central window, pure helpers, and documents that cannot be scored."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from heads.base import Doc
from heads.engine import pipe, plan_batches
from heads.masked_lm import (MaskedLMHead, NoScorableTokensError, document_ids, fill_mask_rows, plan_fill_mask,
                             plan_pseudo_perplexity, pseudo_perplexity_row, top_k)
from heads.ner import window_positions
from taskheads.tiny_models import base_tokenizer

FILL_DOCS = [
    "Paris is the [MASK] of France.",
    "The [MASK] sat on the [MASK] near the old wooden door.",
    "No mask in this one at all.",
    "[MASK]",
    "She bought three [MASK] and a [MASK] at the market yesterday morning.",
    "",
    "Zürich 🙂 is [MASK] in winter, très [MASK]!",
    "The quick brown fox jumps over the lazy dog while the [MASK] watches.",
]

PPPL_DOCS = [
    "Paris is the capital of France.",
    "The cat sat on the mat near the old wooden door.",
    "unbelievably hyperparameterization",
    "a",
    "Zürich 🙂 is cold in winter, très froid!",  # 🙂 is [UNK]: context, not scored
    "She bought three apples and a [MASK] at the market.",  # a literal mask: context, not scored
]

LONG_WORDS = ("Alexander von Humboldt travelled from Berlin to Caracas with Aimé Bonpland, collecting "
              "thousands of hyperspecialised botanical specimens along the Orinoco; ").split()

TOP_K = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
    barriers of an oversubscribed pool make each small call ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_mlm(path, max_len: int, seed: int = 0, hidden: int = 32, layers: int = 2, init_range: float = 0.2):
    """A tiny random BertForMaskedLM over the BERT WordPiece vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    tok = base_tokenizer(max_len)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=hidden * 2, max_position_embeddings=max_len, initializer_range=init_range)
    model = BertForMaskedLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path, use_safetensors=True).eval()
    return model, tok


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    path = build_mlm(tmp_path_factory.mktemp("mlm64"), 64, seed=1)
    return (path, *_load(path))


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    path = build_mlm(tmp_path_factory.mktemp("mlm32"), 32, seed=2)
    return (path, *_load(path))


def _head(loaded, **params):
    _, model, tok = loaded
    return MaskedLMHead("mlm", model, tok, params)


def _logits(model, ids) -> np.ndarray:
    """One unbatched model call, float64 logits [len, vocab]."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)])).logits[0].double().numpy()


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _brute_top_k(p, k):
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]
    return order, [p[i] for i in order]


# --- 1. fill_mask parity ----------------------------------------------------------------------

def test_fill_mask_parity(short_model):
    from transformers import pipeline

    _, model, tok = short_model
    head = _head(short_model, top_k=TOP_K)
    assert head.table == "fill_mask" and head.task == "masked_lm"
    docs = [Doc(f"d{i}", t) for i, t in enumerate(FILL_DOCS)]
    feats = [f for d in docs for f in head.encode(d)]
    assert len(feats) == sum("[MASK]" in t for t in FILL_DOCS)  # each short doc: one window, masks together
    budget = 48
    batches = plan_batches([f.length for f in feats], budget)
    mixed = [b for b in batches if len(b) > 1]
    assert mixed and any(len({feats[j].length for j in b}) > 1 for b in mixed)  # docs share a padded batch

    results = pipe(head, docs, token_budget=budget)
    hf = pipeline("fill-mask", model=model, tokenizer=tok, top_k=TOP_K)
    n_masks, top1 = 0, set()
    for r in results:
        assert r.error is None, r.error
        ids = tok(r.doc.text)["input_ids"]
        mask_pos = [j for j, t in enumerate(ids) if t == tok.mask_token_id]
        if not mask_pos:
            assert r.rows == []
            continue
        probs = _softmax(_logits(model, ids))
        assert [row["mask_index"] for row in r.rows] == [m for m in range(len(mask_pos)) for _ in range(TOP_K)]
        assert [row["rank"] for row in r.rows] == list(range(1, TOP_K + 1)) * len(mask_pos)
        for m, j in enumerate(mask_pos):
            want_ids, want_scores = _brute_top_k(probs[j], TOP_K)
            got = [row for row in r.rows if row["mask_index"] == m]
            assert [row["token_id"] for row in got] == want_ids
            assert np.allclose([row["score"] for row in got], want_scores, atol=1e-5, rtol=0)
            assert [row["token"] for row in got] == [tok.decode([i]).strip() for i in want_ids]
            top1.add(got[0]["token_id"])
            n_masks += 1
        for row in r.rows:
            assert set(row) == {"mask_index", "token", "token_id", "score", "rank"}
            assert type(row["score"]) is float and type(row["token_id"]) is int and type(row["rank"]) is int
        if len(mask_pos) == 1:  # the HF fill-mask pipeline agrees on single-mask documents
            ref = hf(r.doc.text)
            assert [(row["token_id"], row["token"]) for row in r.rows] == [(e["token"], e["token_str"].strip()) for e in ref]
            assert np.allclose([row["score"] for row in r.rows], [e["score"] for e in ref], atol=1e-5, rtol=0)
    assert n_masks == sum(t.count("[MASK]") for t in FILL_DOCS) == 9
    assert len(top1) > 1  # not vacuous: the predictions depend on the context


def test_fill_mask_top_k_is_honoured(short_model):
    head = _head(short_model, top_k=2)
    [r] = pipe(head, [Doc("a", FILL_DOCS[1])])
    assert [(row["mask_index"], row["rank"]) for row in r.rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(a["score"] >= b["score"] for a, b in zip(r.rows[::2], r.rows[1::2]))


# --- 2. pseudo-perplexity parity --------------------------------------------------------------

def _naive_pppl(model, tok, text):
    """Salazar et al. by hand: one unbatched call per masked copy of the whole (short) text."""
    ids = tok(text)["input_ids"]
    special = set(tok.all_special_ids)
    seq_ids = tok(text).sequence_ids()
    logps = []
    for j, t in enumerate(ids):
        if seq_ids[j] is None or t in special:
            continue
        masked = list(ids)
        masked[j] = tok.mask_token_id
        logps.append(_log_softmax(_logits(model, masked)[j])[t])
    return logps


def test_pseudo_perplexity_parity(short_model):
    _, model, tok = short_model
    head = _head(short_model, mode="pseudo_perplexity")
    assert head.table == "lm_scores"
    docs = [Doc(f"p{i}", t) for i, t in enumerate(PPPL_DOCS)]
    feats = [f for d in docs for f in head.encode(d)]
    doc_of = [i for i, d in enumerate(docs) for _ in head.encode(d)]
    assert len(feats) == sum(len(_naive_pppl(model, tok, t)) for t in PPPL_DOCS)
    budget = 200
    batches = plan_batches([f.length for f in feats], budget)
    assert any(len({doc_of[j] for j in b}) > 1 for b in batches)  # engine mixes documents

    results = pipe(head, docs, token_budget=budget)
    values = []
    for r in results:
        assert r.error is None, r.error
        [row] = r.rows
        assert set(row) == {"pseudo_perplexity", "n_tokens", "mean_log_prob", "n_windows"}
        logps = _naive_pppl(model, tok, r.doc.text)
        want = math.exp(-np.mean(logps))
        assert row["n_tokens"] == len(logps) and row["n_windows"] == 1
        assert row["pseudo_perplexity"] == pytest.approx(want, rel=1e-4)
        assert row["mean_log_prob"] == pytest.approx(np.mean(logps), rel=1e-4)
        assert type(row["pseudo_perplexity"]) is float and type(row["n_tokens"]) is int
        values.append(row["pseudo_perplexity"])
    assert len({round(v, 3) for v in values}) == len(values)  # not vacuous
    # [UNK] and the literal [MASK] are context only
    unk_doc = tok(PPPL_DOCS[4], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in unk_doc and results[4].rows[0]["n_tokens"] == len(unk_doc) - 1
    assert results[5].rows[0]["n_tokens"] == len(tok(PPPL_DOCS[5], add_special_tokens=False)["input_ids"]) - 1


def _reference_windows(model, tok, text, window, stride):
    """Independent reference: the tokenizer's windows, each run alone, matched to the whole-text tokens
    by their offsets, and for every token the window where it is most central (ties: earlier window)."""
    full = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    g_ids, g_off = full["input_ids"], [tuple(o) for o in full["offset_mapping"]]
    assert len(set(g_off)) == len(g_off)  # plain text: offsets identify tokens
    enc = tok(text, truncation=True, max_length=window, stride=stride, return_overflowing_tokens=True,
              return_offsets_mapping=True, return_special_tokens_mask=True)
    windows = []
    for k, w_ids in enumerate(enc["input_ids"]):
        text_pos = [j for j, m in enumerate(enc["special_tokens_mask"][k]) if not m]
        first = g_off.index(tuple(enc["offset_mapping"][k][text_pos[0]]))
        assert [w_ids[j] for j in text_pos] == g_ids[first:first + len(text_pos)]
        windows.append({"ids": list(w_ids), "first": first, "n": len(text_pos), "text_pos": text_pos})
    choice = []
    for t in range(len(g_ids)):
        cands = [(min(t - w["first"], w["first"] + w["n"] - 1 - t), -k, k)
                 for k, w in enumerate(windows) if w["first"] <= t < w["first"] + w["n"]]
        k = max(cands)[2]
        choice.append((k, windows[k]["text_pos"][t - windows[k]["first"]]))
    return g_ids, choice, windows


def _long_text(n_repeats=3, mask_every=0):
    words = LONG_WORDS * n_repeats
    if mask_every:
        words = [("[MASK]" if i % mask_every == 3 else w) for i, w in enumerate(words)]
    return " ".join(words)


@pytest.mark.parametrize("stride", [128, 5])
def test_pseudo_perplexity_long_document(long_model, stride):
    _, model, tok = long_model
    head = _head(long_model, mode="pseudo_perplexity", stride=stride)
    window = head.max_length()
    assert window == 32 and 0 < head.stride < window and head.stride == min(stride, 15)
    text = _long_text(3)
    g_ids, choice, windows = _reference_windows(model, tok, text, window, head.stride)
    assert len(windows) > 3 and len({k for k, _ in choice}) == len(windows)  # every window scores tokens

    # reference: every token masked in its chosen window, one unbatched call each
    ref = []
    for t, (k, j) in enumerate(choice):
        masked = list(windows[k]["ids"])
        assert masked[j] == g_ids[t]
        masked[j] = tok.mask_token_id
        ref.append(_log_softmax(_logits(model, masked)[j])[g_ids[t]])

    feats = head.encode(Doc("long", text))
    assert len(feats) == len(g_ids)
    assert sorted(f.meta["token"] for f in feats) == list(range(len(g_ids)))  # each token scored exactly once
    assert [(f.meta["window"], f.meta["position"]) for f in feats] == choice

    short = [Doc(f"s{i}", t) for i, t in enumerate(PPPL_DOCS)]
    results = pipe(head, short[:3] + [Doc("long", text)] + short[3:], token_budget=32 * 5)
    assert all(r.error is None for r in results)
    row = results[3].rows[0]
    assert row["n_windows"] == len(windows) > 1
    assert row["n_tokens"] == len(g_ids) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert row["mean_log_prob"] == pytest.approx(np.mean(ref), rel=1e-4)
    assert row["pseudo_perplexity"] == pytest.approx(math.exp(-np.mean(ref)), rel=1e-4)
    # the short documents are not disturbed by the long one
    alone = pipe(head, short, token_budget=32 * 5)
    for a, b in zip(alone, results[:3] + results[4:]):
        assert a.rows[0]["pseudo_perplexity"] == pytest.approx(b.rows[0]["pseudo_perplexity"], rel=1e-5)


def test_fill_mask_long_document(long_model):
    _, model, tok = long_model
    head = _head(long_model, top_k=3)
    text = _long_text(3, mask_every=7)
    g_ids, choice, windows = _reference_windows(model, tok, text, head.max_length(), head.stride)
    masks = [t for t, i in enumerate(g_ids) if i == tok.mask_token_id]
    assert len(windows) > 3 and len(masks) > 5
    used = {choice[t][0] for t in masks}
    assert len(used) > 2
    window_probs = {k: _softmax(_logits(model, windows[k]["ids"])) for k in used}

    feats = head.encode(Doc("long", text))
    assert len(feats) == len(used)  # windows without a chosen mask are not run
    results = pipe(head, [Doc("a", FILL_DOCS[0]), Doc("long", text), Doc("b", FILL_DOCS[1])], token_budget=80)
    assert all(r.error is None for r in results)
    rows = results[1].rows
    assert len(rows) == 3 * len(masks)
    for m, t in enumerate(masks):
        k, j = choice[t]
        want_ids, want_scores = _brute_top_k(window_probs[k][j], 3)
        got = [row for row in rows if row["mask_index"] == m]
        assert [row["rank"] for row in got] == [1, 2, 3]
        assert [row["token_id"] for row in got] == want_ids
        assert np.allclose([row["score"] for row in got], want_scores, atol=1e-5, rtol=0)


# --- 3. pure helpers, parameters, failures ----------------------------------------------------

def test_top_k_order_ties_and_cap():
    p = np.array([[0.1, 0.3, 0.05, 0.3, 0.25], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    ids, scores = top_k(p, 3)
    assert ids.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert np.allclose(scores, [[0.3, 0.3, 0.25], [0.2, 0.2, 0.2]])
    ids, _ = top_k(p, 10)  # capped at the vocabulary
    assert ids.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]]
    rng = np.random.default_rng(0)
    for _ in range(200):  # brute force, with many ties
        q = rng.integers(0, 6, size=(2, 40)).astype(np.float64)
        k = int(rng.integers(1, 12))
        ids, scores = top_k(q, k)
        for r in range(2):
            want, want_s = _brute_top_k(list(q[r]), k)
            assert ids[r].tolist() == want and scores[r].tolist() == want_s


def test_plans_and_document_ids():
    # 11 text tokens, 6 per window, stride 2: windows cover 0-5, 4-9, 8-10
    masks = [[1] + [0] * 6 + [1], [1] + [0] * 6 + [1], [1] + [0] * 3 + [1]]
    pos = window_positions(masks, stride=2)
    M = 103
    doc = [10, M, 12, 13, M, M, 16, 17, 18, M, 102]  # a literal [SEP] (102) at token 10
    ids = [[101] + doc[0:6] + [102], [101] + doc[4:10] + [102], [101] + doc[8:11] + [102]]
    assert document_ids(ids, pos).tolist() == doc
    # masks 0..3 at tokens 1, 4, 5, 9: token 4 -> window 0 (position 5), 5 -> window 1, 9 -> window 2
    assert plan_fill_mask(ids, pos, M) == [
        {"window": 0, "positions": [2, 5], "mask_index": [0, 1]},
        {"window": 1, "positions": [2], "mask_index": [2]},
        {"window": 2, "positions": [2], "mask_index": [3]},
    ]
    assert plan_fill_mask(ids, pos, 999) == []
    plan = plan_pseudo_perplexity(ids, pos, special_ids={M, 102, 101})
    assert [p["token"] for p in plan] == [0, 2, 3, 6, 7, 8]
    assert [(p["window"], p["position"], p["target_id"]) for p in plan] == [
        (0, 1, 10), (0, 3, 12), (0, 4, 13), (1, 3, 16), (1, 4, 17), (1, 5, 18)]
    assert len(plan_pseudo_perplexity(ids, pos)) == 11
    assert plan_pseudo_perplexity([[101, 102]], [np.array([-1, -1])]) == []
    bad = [list(w) for w in ids]
    bad[1][1] = 55  # window 1 says token 4 is 55, window 0 says 103
    with pytest.raises(ValueError, match="disagrees"):
        document_ids(bad, pos)


def test_rows_helpers():
    rows = fill_mask_rows([1, 0], [[7, 8], [5, 6]], [[0.6, 0.3], [0.5, 0.4]], lambda i: f"t{i}")
    assert rows == [
        {"mask_index": 0, "token": "t5", "token_id": 5, "score": 0.5, "rank": 1},
        {"mask_index": 0, "token": "t6", "token_id": 6, "score": 0.4, "rank": 2},
        {"mask_index": 1, "token": "t7", "token_id": 7, "score": 0.6, "rank": 1},
        {"mask_index": 1, "token": "t8", "token_id": 8, "score": 0.3, "rank": 2},
    ]
    assert fill_mask_rows([], [], [], str) == []
    with pytest.raises(ValueError):
        fill_mask_rows([0, 0], [[1], [2]], [[0.5], [0.5]], str)
    row = pseudo_perplexity_row([0, 1, 2], [math.log(0.5), math.log(0.25), math.log(0.125)], 2)
    assert row == {"pseudo_perplexity": pytest.approx(4.0), "n_tokens": 3, "mean_log_prob": pytest.approx(math.log(0.25)),
                   "n_windows": 2}
    with pytest.raises(NoScorableTokensError):
        pseudo_perplexity_row([], [], 1)
    with pytest.raises(ValueError, match="twice"):
        pseudo_perplexity_row([0, 0], [-1.0, -2.0], 1)


def test_validate_params(short_model):
    ok = dict(MaskedLMHead.params)
    MaskedLMHead.validate_params(ok)
    for bad, match in [({"mode": "perplexity"}, "mode"), ({"mode": None}, "mode"), ({"top_k": 0}, "top_k"),
                       ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k"), ({"stride": -1}, "stride"),
                       ({"stride": "8"}, "stride"), ({"stride": False}, "stride")]:
        with pytest.raises(ValueError, match=match):
            MaskedLMHead.validate_params({**ok, **bad})
        with pytest.raises(ValueError, match=match):
            _head(short_model, **bad)
    assert MaskedLMHead.table == "fill_mask"
    assert _head(short_model).table == "fill_mask"
    assert _head(short_model, mode="pseudo_perplexity").table == "lm_scores"


def test_unscorable_documents_fail_in_encode(short_model):
    head = _head(short_model, mode="pseudo_perplexity")
    docs = [Doc("ok", "A perfectly ordinary sentence."), Doc("empty", ""), Doc("blank", "  \n\t "),
            Doc("special", "[MASK] [SEP] 🙂"), Doc("ok2", "Another one.")]
    results = pipe(head, docs, token_budget=64)
    assert [r.error is None for r in results] == [True, False, False, False, True]
    for r in results[1:4]:
        assert r.stage == "encode" and r.rows == []
        assert r.error.startswith("NoScorableTokensError") and "no scorable token" in r.error
    assert results[0].rows[0]["n_tokens"] == 5 and results[4].rows[0]["n_tokens"] == 3
    with pytest.raises(ValueError):
        head.encode(Doc("empty", ""))
    # in fill_mask mode the same documents are fine: no mask, no rows
    fm = pipe(_head(short_model), docs, token_budget=64)
    assert [r.error for r in fm] == [None] * 5
    assert [len(r.rows) for r in fm] == [0, 0, 0, TOP_K, 0]


def test_load_head_through_registry(short_model, monkeypatch):
    import heads.registry
    from heads.loading import load_head

    monkeypatch.setitem(heads.registry.HEADS, "masked_lm", "heads.masked_lm:MaskedLMHead")
    path = str(short_model[0])
    head = load_head("mlm", "masked_lm", path, params={"mode": "pseudo_perplexity"}, device="cpu")
    assert isinstance(head, MaskedLMHead) and (head.task, head.table) == ("masked_lm", "lm_scores")
    [r] = pipe(head, [Doc("x", PPPL_DOCS[0])])
    [ref] = pipe(_head(short_model, mode="pseudo_perplexity"), [Doc("x", PPPL_DOCS[0])])
    assert r.rows[0]["pseudo_perplexity"] == pytest.approx(ref.rows[0]["pseudo_perplexity"], rel=1e-6)
    head = load_head("mlm", "masked_lm", path, params={"top_k": 3}, device="cpu")
    assert head.table == "fill_mask" and len(pipe(head, [Doc("y", FILL_DOCS[0])])[0].rows) == 3
