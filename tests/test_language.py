"""Language head: pure encode/decode, batched detection against one-text-at-a-time lingua, config and lineage."""
from __future__ import annotations

from importlib.metadata import version

import pytest
from lingua import IsoCode639_1, LanguageDetectorBuilder

from heads.base import Doc
from heads.engine import pipe
from heads.language import LanguageHead, best_language
from heads.loading import load_head, model_identity
from pipeline.config import ConfigError, HeadConfig, parse_config

SAMPLES = [  # (expected language, text); mixed lengths so batching reorders them
    ("en", "The committee will publish its final report on the new railway line next Thursday morning. " * 6),
    ("de", "Der Bürgermeister hat gestern angekündigt, dass die Bibliothek im Sommer länger geöffnet bleibt."),
    ("fr", "Les enfants sont allés à la plage avec leurs grands-parents pendant les vacances d'été."),
    ("es", "El gobierno anunció que las nuevas escuelas abrirán sus puertas antes del próximo invierno. " * 3),
    ("en", "She forgot her umbrella at the station, so she walked home in the pouring rain."),
    ("de", "Wir haben uns entschieden, am Wochenende mit dem Fahrrad durch den Schwarzwald zu fahren. " * 4),
    ("fr", "Le musée de la ville présentera une grande exposition consacrée aux peintres impressionnistes."),
    ("es", "Mi hermana trabaja en un hospital y siempre llega a casa muy tarde por la noche."),
]


def make_head(**params) -> LanguageHead:
    return LanguageHead("lang", None, None, params)


@pytest.fixture(scope="module")
def all_languages():
    """One head over all lingua languages and an independent reference detector (models load lazily, once)."""
    return make_head(), LanguageDetectorBuilder.from_all_languages().build()


def rows(head, texts, budget=64):
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)], token_budget=budget)
    assert [r.doc.doc_id for r in results] == [str(i) for i in range(len(texts))]
    assert all(r.error is None and len(r.rows) == 1 for r in results)
    return [r.rows[0] for r in results]


# --- pure: no lingua call -------------------------------------------------------------------------
def test_encode_one_short_feature_per_doc():
    head = make_head(languages=["en", "de"], max_chars=100)
    text = "Ein ziemlich langer Satz. " * 40
    (feat,) = head.encode(Doc("a", text))
    assert feat.meta == {"text": text[:100], "n_chars": 100}
    assert feat.input_ids == [] and feat.length == 100 // 4  # cost without a text-long list
    (short,) = head.encode(Doc("b", "Hi"))
    assert short.meta["n_chars"] == 2 and short.length == 1
    for blank in ["", "   \n\t", "1234 -- 56!"]:
        (f,) = head.encode(Doc("c", blank))
        assert f.meta == {"text": "", "n_chars": len(blank)} and f.length == 1


def test_decode_applies_min_confidence_and_keeps_confidence():
    head = make_head(languages=["en", "de"], min_confidence=0.5)
    (feat,) = head.encode(Doc("a", "Guten Morgen"))
    assert head.decode(Doc("a", "Guten Morgen"), [feat], [("de", 0.75)]) == [
        {"language": "de", "confidence": 0.75, "n_chars": 12}]
    assert head.decode(Doc("a", "Guten Morgen"), [feat], [("de", 0.25)]) == [
        {"language": None, "confidence": 0.25, "n_chars": 12}]
    assert head.decode(Doc("a", ""), [feat], [(None, 0.0)])[0]["language"] is None


def test_best_language_ties_and_zeros():
    class CV:  # lingua's ConfidenceValue shape
        def __init__(self, code, value):
            self.language = type("L", (), {"iso_code_639_1": IsoCode639_1.from_str(code)})()
            self.value = value

    assert best_language([CV("fr", 0.7), CV("es", 0.3)]) == ("fr", 0.7)
    assert best_language([CV("fr", 0.5), CV("es", 0.5)]) == (None, 0.5)
    assert best_language([CV("fr", 0.0), CV("es", 0.0)]) == (None, 0.0)
    assert best_language([]) == (None, 0.0)


def test_model_helpers_do_not_touch_the_missing_model():
    head = make_head(languages=["en", "de"])
    assert head.device.type == "cpu"
    with pytest.raises(TypeError, match="no transformer"):
        head.max_length()


# --- detection ------------------------------------------------------------------------------------
def test_pipe_matches_expected_and_single_text_reference(all_languages):
    head, ref = all_languages
    texts = [t for _, t in SAMPLES]
    stats: dict = {}
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)], token_budget=256, stats=stats)
    assert 1 < stats["batches"] < len(texts)  # several docs per lingua call, and more than one call
    assert [r.doc.doc_id for r in results] == [str(i) for i in range(len(texts))]
    for (expected, text), r in zip(SAMPLES, results):
        (row,) = r.rows
        assert row["language"] == expected
        assert row["n_chars"] == min(len(text), 2000)
        assert row["language"] == ref.detect_language_of(text).iso_code_639_1.name.lower()
        top = ref.compute_language_confidence_values(text)[0]
        assert row["confidence"] == pytest.approx(top.value, abs=1e-9)
        assert 0 < row["confidence"] <= 1


def test_restricted_languages_choose_among_them():
    head = make_head(languages=["EN", "de"])
    assert head.p["languages"] == ["de", "en"]
    ref = LanguageDetectorBuilder.from_iso_codes_639_1(IsoCode639_1.EN, IsoCode639_1.DE).build()
    out = rows(head, [t for _, t in SAMPLES])
    assert {r["language"] for r in out} == {"en", "de"}  # French and Spanish texts still get en or de
    for (expected, text), row in zip(SAMPLES, out):
        if expected in ("en", "de"):
            assert row["language"] == expected
        assert row["language"] == ref.detect_language_of(text).iso_code_639_1.name.lower()
        assert row["confidence"] == pytest.approx(ref.compute_language_confidence_values(text)[0].value, abs=1e-9)


def test_min_confidence_gives_null(all_languages):
    _, ref = all_languages
    head = make_head(min_confidence=0.99)
    short, greek = "prologue", "Το παιδί διαβάζει ένα βιβλίο στον κήπο."
    out = rows(head, [short, greek])
    assert ref.compute_language_confidence_values(short)[0].value < 0.99
    assert out[0]["language"] is None and 0 < out[0]["confidence"] < 0.99  # the confidence is still told
    assert out[1]["language"] == "el" and out[1]["confidence"] >= 0.99  # unique script: lingua is sure


def test_empty_and_letterless_text_give_null():
    head = make_head(languages=["en", "de", "fr"])
    texts = ["", "   ", "12:45 -- 3.14!", SAMPLES[0][1]]
    out = rows(head, texts)
    assert out[:3] == [{"language": None, "confidence": 0.0, "n_chars": len(t)} for t in texts[:3]]
    assert out[3]["language"] == "en"


def test_max_chars_cuts_and_records_it():
    english, german = SAMPLES[4][1], SAMPLES[5][1]
    text = english + " " + german  # German is the bulk of the text
    cut = len(english)
    full = rows(make_head(languages=["en", "de"]), [text])[0]
    prefix = rows(make_head(languages=["en", "de"], max_chars=cut), [text])[0]
    assert (full["language"], full["n_chars"]) == ("de", len(text))
    assert (prefix["language"], prefix["n_chars"]) == ("en", cut)  # only the English start was looked at


def test_non_string_text_fails_only_that_document():
    results = pipe(make_head(languages=["en", "de"]), [Doc("a", None), Doc("b", SAMPLES[1][1])])
    assert results[0].error and results[0].stage == "encode"
    assert results[1].rows[0]["language"] == "de"


# --- parameters, loading, config ----------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"languages": ["en", "xx", "zz"]}, "'xx', 'zz'"),
    ({"languages": ["en"]}, "at least 2"),
    ({"languages": ["en", "EN"]}, "at least 2"),
    ({"languages": "en,de"}, "list of ISO"),
    ({"languages": ["en", 7]}, "list of ISO"),
    ({"min_confidence": -0.1}, "between 0 and 1"),
    ({"min_confidence": 1.5}, "between 0 and 1"),
    ({"max_chars": 0}, ">= 1"),
    ({"max_chars": 2.5}, ">= 1"),
    ({"low_accuracy": "yes"}, "true or false"),
])
def test_validate_params_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        LanguageHead.validate_params({**LanguageHead.params, **params})


def test_load_head_and_model_identity():
    head = load_head("lang", "language", "lingua", params={"languages": ["fr", "es"], "low_accuracy": True})
    assert isinstance(head, LanguageHead) and head.model is None
    assert rows(head, [SAMPLES[2][1], SAMPLES[3][1]])[1]["language"] == "es"
    cfg = HeadConfig(name="lang", task="language", model="lingua", params={"languages": ["fr", "es"]})
    ident = model_identity(cfg, head)
    assert ident["source"] == "lingua" and ident["weights_sha256"] is None
    assert ident["params"]["lingua_version"] == version("lingua-language-detector")
    assert ident["params"]["languages"] == ["es", "fr"]
    same = model_identity(cfg, load_head("lang", "language", "lingua",
                                         params={"languages": ["es", "FR"], "low_accuracy": True}))
    other = model_identity(cfg, load_head("lang", "language", "lingua", params={"languages": ["fr", "es"]}))
    assert same["model_id"] == ident["model_id"] != other["model_id"]


def test_config_language_head_without_model(tmp_path):
    base = {"corpus": "corpus.parquet", "database": "out.duckdb"}
    cfg = parse_config({**base, "heads": {"lang": {"task": "language"}}}, tmp_path)
    (h,) = cfg.heads
    assert (h.task, h.model, dict(h.params)) == ("language", "lingua", {})
    cfg = parse_config({**base, "heads": {"lang": {"task": "language", "languages": ["en", "de"],
                                                   "min_confidence": 1, "max_chars": 500}}}, tmp_path)
    assert dict(cfg.heads[0].params) == {"languages": ["en", "de"], "min_confidence": 1, "max_chars": 500}
    for bad, message in [({"languages": "en"}, "languages: expected a list of ISO 639-1 codes, got str 'en'"), ({"languages": ["en", "qq"]}, "'qq'"),
                         ({"max_chars": 0}, "max_chars"), ({"threshold": 0.5}, "unknown key")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "heads": {"lang": {"task": "language", **bad}}}, tmp_path)
