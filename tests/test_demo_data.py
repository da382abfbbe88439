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


# --- silver NER labels (spaCy's OntoNotes tagger mapped to the head's labels) -------------------

def _spans(text, rows):
    return [(text[e["start"]:e["end"]], e["label"]) for e in rows]


def test_silver_money_made_whole():
    # what spaCy's en_core_web_sm gives on BBC money: the tokenizer splits "£600m" into "£ 600 m"
    # and the entity is "600"; "US$2.5bn" -> "2.5bn"; sometimes a word before the amount
    text = "Profits rose to $1.13bn (£600m), from US$2.5bn, above $53 a barrel; revenues - £160m."
    spans = [(text.index("1.13bn"), text.index("1.13bn") + 6, "MONEY"),
             (text.index("600"), text.index("600") + 3, "MONEY"),
             (text.index("2.5bn"), text.index("2.5bn") + 5, "MONEY"),
             (text.index("above"), text.index("$53") + 3, "MONEY"),
             (text.index("revenues"), text.index("160") + 3, "MONEY")]
    assert _spans(text, dd.map_silver(text, spans)) == [
        ("$1.13bn", "MONEY"), ("£600m", "MONEY"), ("US$2.5bn", "MONEY"), ("$53", "MONEY"), ("£160m", "MONEY")]


def test_silver_labels_mapped_and_cleaned():
    text = ("Mr Blair met the Bank of England's governor in London, Europe and Wembley; British shares rose 5% "
            "on 5 May, the best day of the past year.")
    at = lambda s, label: (text.index(s), text.index(s) + len(s), label)  # noqa: E731
    spans = [at("Blair", "PERSON"), at("the Bank of England's", "ORG"), at("London", "GPE"), at("Europe", "LOC"),
             at("Wembley", "FAC"), at("British", "NORP"), at("5%", "PERCENT"), at("5 May", "DATE"),
             at("the past year", "DATE")]
    rows = dd.map_silver(text, spans)
    assert _spans(text, rows) == [("Blair", "PER"), ("Bank of England", "ORG"), ("London", "LOC"),
                                  ("Europe", "LOC"), ("5 May", "DATE"), ("past year", "DATE")]
    assert all(set(r) == {"start", "end", "label"} for r in rows)


def test_silver_nothing_nameable_is_dropped_and_overlaps_resolved():
    text = "Shares in (Smith & Co) - and the rest."
    spans = [(text.index("-"), text.index("-") + 1, "ORG"),             # pure punctuation
             (text.index("("), text.index(")") + 1, "ORG"),             # brackets stripped
             (text.index("Co"), text.index("Co") + 2, "ORG")]           # inside the previous one
    assert _spans(text, dd.map_silver(text, spans)) == [("Smith & Co", "ORG")]
    assert dd.map_silver(text, [(text.index("the"), text.index("the") + 3, "ORG")]) == []  # "the" alone


def test_sentence_rows_offsets_and_crossing_entities():
    text = "Tony Blair spoke.  Then Gordon\nBrown left. Microsoft won. "
    sentences = [(0, 19), (19, 43), (43, 58)]
    ents = [{"start": 0, "end": 10, "label": "PER"},
            {"start": 24, "end": 36, "label": "PER"},   # "Gordon\nBrown": crosses no sentence break
            {"start": 43, "end": 52, "label": "ORG"}]
    rows = dd.sentence_rows(text, sentences, ents)
    assert rows == [{"text": "Tony Blair spoke.", "entities": [{"start": 0, "end": 10, "label": "PER"}]},
                    {"text": "Then Gordon\nBrown left.", "entities": [{"start": 5, "end": 17, "label": "PER"}]},
                    {"text": "Microsoft won.", "entities": [{"start": 0, "end": 9, "label": "ORG"}]}]
    # a wrong sentence break inside "Gordon Brown": the sentences it touches are left out
    rows = dd.sentence_rows(text, [(0, 19), (19, 31), (31, 58)], ents)
    assert [r["text"] for r in rows] == ["Tony Blair spoke."]


@pytest.fixture(scope="module")
def spacy_nlp():
    return dd.load_silver_model()


def test_annotate_with_real_spacy(spacy_nlp):
    text = ("Blair backs Brown\n\nTony Blair said on Monday that Gordon Brown would stay. "
            "Microsoft paid £600m for the London firm.\n\nShares fell.")
    [a] = dd.annotate(spacy_nlp, [text])
    found = {(text[e["start"]:e["end"]], e["label"]) for e in a["entities"]}
    assert {("Tony Blair", "PER"), ("Monday", "DATE"), ("Microsoft", "ORG"), ("£600m", "MONEY"),
            ("London", "LOC")} <= found
    assert all(e["label"] in dd.NER_TYPES for e in a["entities"])
    sentences = [text[s:e].strip() for s, e in a["sentences"]]
    assert sentences[0] == "Blair backs Brown"  # the title line is never joined to the first sentence
    assert "Shares fell." in sentences and any(s.startswith("Microsoft paid") for s in sentences)


def test_silver_ner_rows(spacy_nlp, bbc):
    train = [r for r in dd.split_bbc(bbc) if r["split"] == "train"][:40]
    rows = dd.silver_ner(spacy_nlp, train, n=60, seed=1)
    assert len(rows) == 60 and rows == dd.silver_ner(spacy_nlp, train, n=60, seed=1)
    texts = {r["text"] for r in train}
    for r in rows:
        assert any(r["text"] in t for t in texts)  # sentences of the given articles, nothing else
        for e in r["entities"]:
            span = r["text"][e["start"]:e["end"]]
            assert span and span == span.strip() and e["label"] in dd.NER_TYPES
    assert sum(len(r["entities"]) for r in rows) >= 30
    assert dd.silver_ner(spacy_nlp, train, n=60, seed=2) != rows
