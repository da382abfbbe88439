"""Demo data builders: the real BBC corpus is complete and split fairly; synthetic NER/QA rows are
exact (spans slice their text) and reproducible, because heads are trained and scored on them."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from taskheads import demo_data as dd

BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
N = 500


@pytest.fixture(scope="module")
def bbc():
    return dd.bbc_articles()


@pytest.fixture(scope="module")
def ner():
    return dd.synthetic_ner(N, seed=7)


@pytest.fixture(scope="module")
def qa():
    return dd.synthetic_qa(N, seed=7)


# --- BBC ---------------------------------------------------------------------------------------

def test_bbc_complete(bbc):
    assert len(bbc) == 2225
    assert Counter(r["topic"] for r in bbc) == BBC_COUNTS
    ids = [r["id"] for r in bbc]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in bbc:
        assert set(r) == {"id", "title", "text", "topic"}
        assert re.fullmatch(rf"{r['topic']}-\d{{3}}", r["id"])
        assert r["title"] and r["title"] == r["title"].strip()
        assert r["text"].lstrip().startswith(r["title"])  # title is part of the text
        assert "\r" not in r["text"] and "\ufffd" not in r["text"]


def test_bbc_known_article_and_latin1_file(bbc):
    by_id = {r["id"]: r for r in bbc}
    assert by_id["business-001"]["title"] == "Ad sales boost Time Warner profit"
    assert "£15.8m" in by_id["sport-199"]["text"]  # the one latin-1 file decodes to a pound sign


def test_split_stratified_and_deterministic(bbc):
    rows = dd.split_bbc(bbc)
    assert rows == dd.split_bbc(bbc)
    assert [r["id"] for r in rows] == [r["id"] for r in bbc] and "split" not in bbc[0]
    assert {r["split"] for r in rows} == {"train", "test"}
    for topic, n in BBC_COUNTS.items():
        test = sum(1 for r in rows if r["topic"] == topic and r["split"] == "test")
        assert abs(test / n - 0.2) < 0.01, (topic, test, n)
    side: dict[str, set[str]] = {}
    for r in rows:
        side.setdefault(r["id"], set()).add(r["split"])
        side.setdefault(r["text"], set()).add(r["split"])
    assert all(len(s) == 1 for s in side.values())  # no id, and no duplicated text, on both sides
    assert dd.split_bbc(list(reversed(bbc))) == list(reversed(rows))  # order-independent
    other = dd.split_bbc(bbc, seed=14)
    assert [r["split"] for r in other] != [r["split"] for r in rows]


# --- NER ---------------------------------------------------------------------------------------

def test_ner_deterministic_and_seeded(ner):
    assert dd.synthetic_ner(N, seed=7) == ner
    assert dd.synthetic_ner(50, seed=7) == ner[:50]
    assert dd.synthetic_ner(50, seed=8) != ner[:50]


def test_ner_spans_exact(ner):
    labels = Counter()
    for r in ner:
        assert set(r) == {"text", "entities"}
        ends = -1
        for e in r["entities"]:
            assert e["label"] in dd.NER_TYPES
            assert ends <= e["start"] < e["end"] <= len(r["text"])  # sorted, non-overlapping
            span = r["text"][e["start"]:e["end"]]
            assert span == span.strip() and span
            ends = e["end"]
            labels[e["label"]] += 1
    assert set(labels) == set(dd.NER_TYPES)
    assert sum(1 for r in ner if not r["entities"]) >= 5  # entity-free examples exist


def test_ner_variety(ner):
    spans = [(r["text"][e["start"]:e["end"]], e["label"]) for r in ner for e in r["entities"]]
    assert any("," in s and lab == "ORG" for s, lab in spans)  # "Smith, Jones and Brown"
    money = {s for s, lab in spans if lab == "MONEY"}
    assert any(s.startswith("$") for s in money) and any(s.startswith("£") for s in money)
    assert any("euros" in s for s in money)
    dates = {s for s, lab in spans if lab == "DATE"}
    assert any(re.fullmatch(r"\d{1,2} [A-Z][a-z]+ \d{4}", s) for s in dates)
    assert any(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}", s) for s in dates)
    assert any(s.endswith("day") for s in dates)
    counts = Counter(len(re.findall(r"[.!?](?:\s|$)", r["text"])) for r in ner)
    assert set(counts) == {1, 2, 3}
    assert len({r["text"] for r in ner}) >= 0.9 * N  # only entity-free one-liners repeat


# --- QA ----------------------------------------------------------------------------------------

def _occurrences(haystack: str, needle: str) -> int:
    return sum(1 for i in range(len(haystack)) if haystack.startswith(needle, i))


def test_qa_deterministic_and_seeded(qa):
    assert dd.synthetic_qa(N, seed=7) == qa
    assert dd.synthetic_qa(50, seed=7) == qa[:50]
    assert dd.synthetic_qa(50, seed=8) != qa[:50]


def test_qa_answers_exact_and_unambiguous(qa):
    for r in qa:
        assert set(r) == {"context", "question", "answer_start", "answer_text"}
        a, s = r["answer_text"], r["answer_start"]
        assert a and r["context"][s:s + len(a)] == a
        assert _occurrences(r["context"], a) == 1, r
        assert r["question"].endswith("?")
        assert 3 <= len(re.findall(r"[.!?](?:\s|$)", r["context"])) <= 6, r["context"]


def test_qa_question_kinds_varied(qa):
    patterns = []
    for kind, (_, _, phrasings) in dd._QA_KINDS.items():
        for p in phrasings:
            rx = re.sub(r"\\\{[A-Z]+\\\}", ".+", re.escape(p))
            patterns.append((kind, p, re.compile(rx)))
    kinds, phrasings = Counter(), Counter()
    for r in qa:
        hits = [(k, p) for k, p, rx in patterns if rx.fullmatch(r["question"])]
        assert hits, r["question"]
        kinds[hits[0][0]] += 1
        phrasings[hits[0][1]] += 1
    assert len(kinds) >= 8 and len(phrasings) >= 20
