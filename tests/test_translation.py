"""TranslationHead: padding parity of batched generate(), sentence segmentation, the pure splitter."""
from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heads.base import Doc, DocumentError, Feature, trim_generated
from heads.engine import pipe
from heads.loading import load_head
from heads.translation import Segment, TranslationHead, join_translations, split_segments, split_sentences
from taskheads.tiny_models import build_bart

EOS_BIAS = 2.0  # makes the random model end some outputs early and run others to max_new_tokens


@pytest.fixture(scope="module")
def bart128(tmp_path_factory):
    return str(build_bart(tmp_path_factory.mktemp("bart128"), max_len=128, seed=0))


@pytest.fixture(scope="module")
def bart32(tmp_path_factory):
    return str(build_bart(tmp_path_factory.mktemp("bart32"), max_len=32, seed=1))


def load(path: str, eos_bias: float = EOS_BIAS, **params) -> TranslationHead:
    head = load_head("tr", "translation", path, params=params, device="cpu")
    with torch.no_grad():  # a random model never says eos; nudge it so outputs have different lengths
        head.model.final_logits_bias[0, head.model.config.eos_token_id] += eos_bias
    return head


def reference_ids(head: TranslationHead, input_ids: list[int], num_beams: int, max_new_tokens: int) -> list[int]:
    """generate() on one segment alone: batch of one, no padding, no attention mask."""
    with torch.inference_mode():
        out = head.model.generate(input_ids=torch.tensor([input_ids]), num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, do_sample=False)
    assert out.shape[0] == 1
    return out[0, 1:].tolist()  # drop the decoder start token


def decode_ref(head: TranslationHead, ids: list[int]) -> str:
    return head.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


def assert_covers(text: str, segs: list[Segment]) -> None:
    """Segments are in order, trimmed, non-empty, and only whitespace lies between and around them."""
    assert segs
    pos = 0
    for s in segs:
        assert s.text == text[s.start:s.end]
        assert s.text and s.text == s.text.strip()
        assert s.start >= pos and text[pos:s.start].strip() == ""
        pos = s.end
    assert text[pos:].strip() == ""
    rebuilt = text[:segs[0].start] + "".join(
        s.text + text[s.end:(segs[k + 1].start if k + 1 < len(segs) else len(text))] for k, s in enumerate(segs))
    assert rebuilt == text


WORDS = ("the quick brown fox jumps over a lazy dog near the river while seven musicians play "
         "old songs about mountains weather paper cities and data models in the evening").split()


def make_text(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    words, out = [rng.choice(WORDS) for _ in range(n_words)], []
    for k, w in enumerate(words):
        out.append(w.capitalize() if k == 0 or out[-1].endswith(".") else w)
        if k % 9 == 8 and k + 1 < n_words:
            out[-1] += "."
    return " ".join(out) + "."


# --- 1. padding parity --------------------------------------------------------------------------

PARITY_LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 90, 150]  # the last one is two segments at 128 tokens


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_generation_matches_generation_alone(bart128, monkeypatch, num_beams):
    max_new = 20
    head = load(bart128, num_beams=num_beams, max_new_tokens=max_new)
    docs = [Doc(f"d{k}", make_text(n, seed=k)) for k, n in enumerate(PARITY_LENGTHS)]

    calls: list[tuple[list[Feature], list[list[int]]]] = []
    real_forward = head.forward

    def spy(feats):
        outs = real_forward(feats)
        calls.append((list(feats), outs))
        return outs

    monkeypatch.setattr(head, "forward", spy)
    results = pipe(head, docs, token_budget=160)
    assert all(r.error is None for r in results), [r.error for r in results]

    # the batches really mixed documents of different lengths (so there was padding)
    padded = [fs for fs, _ in calls if len({f.length for f in fs}) > 1 and len({f.doc_index for f in fs}) > 1]
    assert len(padded) >= 2, [[f.length for f in fs] for fs, _ in calls]
    assert max(len(fs) for fs, _ in calls) >= 4

    # every feature: same ids as generate() alone
    n_feats = 0
    ended_early = ran_full = 0
    by_doc: dict[int, list[tuple[int, list[int]]]] = {}
    for fs, outs in calls:
        for f, ids in zip(fs, outs):
            ref = reference_ids(head, f.input_ids, num_beams, max_new)
            assert ids == ref, (f.doc_index, f.meta, f.length)
            n_feats += 1
            ended_early += ids[-1] == head.model.config.eos_token_id and len(ids) < max_new
            ran_full += len(ids) == max_new
            by_doc.setdefault(f.doc_index, []).append((f.meta["segment"], ref))
    assert n_feats == sum(len(head.encode(d)) for d in docs)
    # both kinds of rows occurred, so padding after eos was exercised and stripped
    assert ended_early >= 1 and ran_full >= 1, (ended_early, ran_full)

    # every document: same string as the per-segment references joined
    for i, r in enumerate(results):
        refs = [decode_ref(head, ids) for _, ids in sorted(by_doc[i])]
        assert r.rows == [{"translation": " ".join(t for t in refs if t), "n_segments": len(refs)}]
    assert results[-1].rows[0]["n_segments"] == 2
    translations = [r.rows[0]["translation"] for r in results]
    assert len(set(translations)) > len(translations) // 2  # outputs depend on the input


# --- 2. long documents are split at sentence boundaries -----------------------------------------

def test_long_document_is_split_at_sentence_boundaries(bart32):
    max_new = 12
    head = load(bart32, max_new_tokens=max_new)
    assert head.window == 32
    over_long = "a sentence without any full stop " + " ".join(["that keeps going"] * 12)
    text = ("The fox jumps. It runs over the river and far away into the old mountains today! "
            "Who plays music in the evening? Seven musicians.\nThey sing old songs about the weather "
            "and paper cities. " + over_long + ". Short one. Then the data models arrive in town. "
            "The end.")
    segs = head.segments(text)
    assert len(segs) > 2
    assert_covers(text, segs)
    for s in segs:
        assert head.n_tokens(s.text) <= head.window
    # segments outside the over-long sentence start and end at sentence boundaries, and are maximal
    sents = split_sentences(text)
    starts, ends = {a for a, _ in sents}, {b for _, b in sents}
    lo = text.index(over_long)
    hi = lo + len(over_long) + 1
    whole = [s for s in segs if s.end <= lo or s.start >= hi]
    windows = [s for s in segs if lo <= s.start and s.end <= hi]
    assert len(whole) + len(windows) == len(segs) and len(windows) >= 2 and len(whole) >= 2
    for k, s in enumerate(segs):
        if s in whole:
            assert s.start in starts and s.end in ends
            if k + 1 < len(segs) and segs[k + 1] in whole:  # greedy: the next sentence did not fit
                next_end = min(b for a, b in sents if a >= segs[k + 1].start)
                assert head.n_tokens(text[s.start:next_end]) > head.window

    [r] = pipe(head, [Doc("long", text)], token_budget=64)
    assert r.error is None, r.error
    feats = head.encode(Doc("long", text))
    assert [f.meta["segment"] for f in feats] == list(range(len(segs)))
    assert all(f.meta["n_segments"] == len(segs) and f.length <= 32 for f in feats)
    refs = []
    for s in segs:
        ids = head.tokenizer(s.text, return_token_type_ids=False)["input_ids"]
        refs.append(decode_ref(head, reference_ids(head, ids, 1, max_new)))
    assert r.rows == [{"translation": " ".join(t for t in refs if t), "n_segments": len(segs)}]


def test_short_document_is_one_segment_and_prefix_counts(bart32):
    head = load(bart32, prefix="translate english to german: ", max_new_tokens=4)
    text = "  Two sentences. Both fit the window.  "
    [f] = head.encode(Doc("s", text))
    assert f.meta == {"segment": 0, "n_segments": 1, "start": 2, "end": len(text) - 2}
    assert f.input_ids == head.tokenizer("translate english to german: " + text.strip())["input_ids"]
    assert f.token_type_ids is None
    # the prefix eats the window: the same text needs more segments with it than without
    long_text = " ".join(f"Sentence number {k} is here." for k in range(10))
    plain = load(bart32, max_new_tokens=4)
    with_prefix = head.encode(Doc("l", long_text))
    assert len(with_prefix) > len(plain.encode(Doc("l", long_text))) > 1
    assert all(f.length <= 32 for f in with_prefix)


def test_max_new_tokens_is_capped_by_decoder_positions(bart32):
    head = load(bart32, eos_bias=-100.0)  # default max_new_tokens=256, never stops early
    assert head.max_new_tokens == 32
    [r] = pipe(head, [Doc("x", "A few words.")])
    assert r.error is None, r.error
    assert len(head.forward(head.encode(Doc("x", "A few words.")))[0]) == 32


@pytest.mark.parametrize("params, match", [
    ({"num_beams": 0}, "num_beams"), ({"num_beams": True}, "num_beams"), ({"num_beams": 1.5}, "num_beams"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "9"}, "max_new_tokens"),
    ({"prefix": None}, "prefix"), ({"prefix": "word " * 40}, "prefix"),
])
def test_setup_rejects_bad_params(bart32, params, match):
    head = load(bart32)
    with pytest.raises(ValueError, match=match):
        TranslationHead("tr", head.model, head.tokenizer, params)


# --- 3. the pure splitter -----------------------------------------------------------------------

def words_tokenizer(overhead: int = 2):
    """A stub tokenizer: one token per run of non-space characters, `overhead` special tokens."""
    def offsets(s: str):
        return [m.span() for m in re.finditer(r"\S+", s)]

    def n_tokens(s: str) -> int:
        return overhead + len(offsets(s))

    return n_tokens, offsets


def texts(segs: list[Segment]) -> list[str]:
    return [s.text for s in segs]


def test_split_sentences():
    text = "Hello world. How are you?  Fine!\nNew line\r\nand \"quoted.\" Pi is 3.14 today... Done"
    got = [text[a:b] for a, b in split_sentences(text)]
    assert got == ["Hello world.", "How are you?", "Fine!", "New line", "and \"quoted.\"", "Pi is 3.14 today...",
                   "Done"]
    assert split_sentences("   \n\n  ") == []
    assert [("日本語です。", "東京は大きい！")[i] for i in range(2)] == [
        "日本語です。東京は大きい！"[a:b] for a, b in split_sentences("日本語です。東京は大きい！")]


def test_whole_text_fits_in_one_segment():
    n_tokens, offsets = words_tokenizer()
    text = "\n  One. Two three! Four?  "
    assert split_segments(text, 6, n_tokens, offsets) == [Segment(3, 24, "One. Two three! Four?")]


def test_sentences_are_packed_greedily():
    n_tokens, offsets = words_tokenizer()
    text = "A b. C d e. F. G h i j k. L m."
    segs = split_segments(text, 6, n_tokens, offsets)  # 4 content tokens per segment
    # A b. (2) + C d e. (3) = 5 > 4: new segment; C d e. F. = 4 fits; G h i j k. alone is 5 > 4: windows
    assert texts(segs) == ["A b.", "C d e. F.", "G h i j", "k.", "L m."]
    assert_covers(text, segs)
    assert all(n_tokens(s.text) <= 6 for s in segs)


def test_one_over_long_sentence_is_cut_into_token_windows():
    n_tokens, offsets = words_tokenizer(overhead=1)
    text = "Short. " + " ".join(f"w{k}" for k in range(11)) + " end. Tail."
    segs = split_segments(text, 5, n_tokens, offsets)  # 4 content tokens per window, no overlap
    assert texts(segs) == ["Short.", "w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9 w10 end.", "Tail."]
    assert_covers(text, segs)


def test_no_text_lost_with_real_tokenizer_and_unicode(bart32):
    head = load(bart32)
    text = ("Café naïve résumé — déjà vu!  東京は大きい。日本語のテキストです。\n"
            "Emoji 🎉🎉 and zero\u200bwidth\u200bjoiners inside a long long sentence that goes on and on "
            "with Ünïcödé wörds, ﬁligatures, and Ελληνικά λέξεις, and even more words here, "
            "and extra words until the window overflows many times over "
            + "supercalifragilisticexpialidocious " * 8 + "\u2028Last\u00a0line? Yes.")
    segs = head.segments(text)
    assert len(segs) > 3
    assert_covers(text, segs)
    assert all(head.n_tokens(s.text) <= head.window for s in segs)
    feats = head.encode(Doc("u", text))
    assert [f.input_ids for f in feats] == [head.input_ids(s.text) for s in segs]


def test_split_segments_errors():
    n_tokens, offsets = words_tokenizer(overhead=3)
    with pytest.raises(DocumentError, match="empty text"):  # the document's fault: failed_docs, terminal
        split_segments(" \n\t ", 10, n_tokens, offsets)
    with pytest.raises(ValueError, match="no room"):
        split_segments("one two three four", 3, n_tokens, offsets)


ALPHABET = st.sampled_from(list("abcxyz é日🎉") + [" ", " ", "  ", ".", "!", "?", "\n", ". ", "3.1", "\u200b"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(ALPHABET, min_size=1, max_size=80), limit=st.integers(3, 9), overhead=st.integers(0, 2))
def test_split_segments_properties(parts, limit, overhead):
    text = "".join(parts)
    n_tokens, offsets = words_tokenizer(overhead)
    if not text.strip():
        with pytest.raises(DocumentError):
            split_segments(text, limit, n_tokens, offsets)
        return
    segs = split_segments(text, limit, n_tokens, offsets)
    assert_covers(text, segs)
    assert all(n_tokens(s.text) <= limit for s in segs)
    if n_tokens(text.strip()) <= limit:
        assert len(segs) == 1


# --- pure pieces of forward / decode ------------------------------------------------------------

def test_trim_generated():
    assert trim_generated([101, 5, 6, 102, 0, 0], {102}) == [5, 6, 102]
    assert trim_generated([101, 0, 6, 7], {102}) == [0, 6, 7]  # a generated pad id mid-sequence stays
    assert trim_generated([0, 5, 1, 9, 1, 0], {1, 2}) == [5, 1]  # T5: pad is the decoder start
    assert trim_generated([101], {102}) == []


def test_decode_orders_segments_and_joins(bart32):
    head = load(bart32)
    tok = head.tokenizer
    feats = [Feature(0, [101], None, {"segment": k, "n_segments": 3}) for k in range(3)]
    outs = [tok.encode(w, add_special_tokens=False) + [102] for w in ("hello world", "  ", "good night")]
    rows = head.decode(Doc("d", "x"), feats[::-1], outs[::-1])
    assert rows == [{"translation": "hello world good night", "n_segments": 3}]
    assert join_translations([" a ", "", "b"]) == "a b"


# --- 4. empty text ------------------------------------------------------------------------------

def test_empty_text_fails_at_encode(bart32):
    head = load(bart32, max_new_tokens=4)
    results = pipe(head, [Doc("a", ""), Doc("b", "  \n\t "), Doc("c", "Fine text.")])
    for r in results[:2]:
        assert r.error == "DocumentError: empty text" and r.stage == "encode" and r.rows == []
    assert results[2].error is None and results[2].rows[0]["n_segments"] == 1
