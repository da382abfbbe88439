"""The model id of an unchanged config never changes: it keys every stored result (a new id means the
whole corpus is inferred again). The ids below were computed by the code before the typed head
declarations (issue 14), with identity version 1; identity version 2 (heads/identity.py) hashes more
files, so these are now each config's `legacy_model_id`, which the database maps to the new id
(storage.db.register_model): they must stay exactly these, computed with and without a loaded head."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from heads.loading import load_head, model_identity
from pipeline.config import parse_config
from taskheads.tiny_models import build_bert, build_causal_lm


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    return {**tiny_models,
            "masked_lm": str(build_bert(root / "mlm", "masked_lm", max_len=64, seed=6)),
            "multiple_choice": str(build_bert(root / "mc", "multiple_choice", max_len=64, seed=7)),
            "causal_lm": build_causal_lm(root / "lm", max_len=64, seed=8),
            "embedding": tiny_models["classification"]}


# (task, keys as a config gives them) -> the model id the code before the refactor computed
PINNED = [
    ("classification", {}, "1082486a82dad5fb"),
    ("classification", {"long_text": "truncate", "stride": 32, "batch_tokens": 1024}, "8940a994744475e6"),
    ("ner", {"aggregation": "SIMPLE", "stride": 16, "ignore_labels": ["O", "B-LOC"]}, "c8b7a023a193ed58"),
    ("qa", {"questions": ["Who?", "When?"], "max_seq_len": 100, "doc_stride": 32, "allow_no_answer": True}, "3f34edd5205fd6a9"),
    ("translation", {"num_beams": 2, "max_new_tokens": 20, "prefix": "x: "}, "26be2b273295a1e5"),
    ("language", {"languages": ["en", "DE"], "min_confidence": 1, "max_chars": 500}, "58f4e0911594d3e0"),
    ("masked_lm", {"mode": "pseudo_perplexity", "top_k": 3}, "ca847e3c9defe44c"),
    ("causal_lm", {"mode": "generate", "prompt": "Q: {text}", "temperature": 2, "top_p": 1, "do_sample": True,
                   "seed": 4, "max_new_tokens": 16}, "61492e290b550bad"),
    ("multiple_choice", {"choices": ["a", "b"], "prompt": "{text}?"}, "f7c2bab6b0b3d658"),
    ("embedding", {"pooling": "cls", "stride": 8}, "69b0c5a1aa6e46f2"),
    ("embedding", {"normalize": True, "per_window": True, "max_seq_length": 32}, "042937c1626efb73"),
]


@pytest.mark.parametrize("task, keys, expected", PINNED)
def test_model_id_of_an_unchanged_config_is_pinned(tmp_path, models, task, keys, expected, monkeypatch):
    raw = {"task": task, **({"model": models[task]} if task != "language" else {}), **keys}
    cfg = parse_config({"corpus": "c.parquet", "database": "r.duckdb", "heads": {"h": raw}}, tmp_path)
    (h,) = cfg.heads
    head = load_head(h.name, h.task, h.model, params=h.params, device="cpu")
    # the folder's path and weights vary per test session: hash a fixed source name instead (version 1
    # hashed no files for a source that is not a folder), reading the files from the real folder
    import heads.identity

    real = heads.identity.model_folder(h)
    monkeypatch.setattr(heads.identity, "model_folder", lambda cfg: real)
    pinned = SimpleNamespace(**{**vars_of(h), "model": f"pinned/{task}"})
    assert model_identity(pinned, head)["legacy_model_id"] == expected
    assert model_identity(pinned)["legacy_model_id"] == expected  # from the files, no model loaded


def vars_of(h) -> dict:
    return {k: getattr(h, k) for k in ("name", "task", "model", "revision", "dtype", "params")}


def test_a_key_added_later_changes_the_id_only_when_set(tmp_path, models):
    """NER's `words`, `drop_punctuation` and `stop_words` came after ids were in use: at their
    defaults they leave the id as it was (pinned above); set, they change it (other output)."""
    def ids(keys):
        raw = {"task": "ner", "model": models["ner"], **keys}
        (h,) = parse_config({"corpus": "c.parquet", "database": "r.duckdb", "heads": {"h": raw}}, tmp_path).heads
        return model_identity(h)["model_id"]

    default = ids({})
    assert ids({"words": "pipeline", "drop_punctuation": False, "stop_words": []}) == default
    changed = [ids({"words": "whitespace", "aggregation": "first"}), ids({"drop_punctuation": True}),
               ids({"stop_words": ["of"]})]
    assert default not in changed and len(set(changed)) == 3
    assert ids({"aggregation": "first", "words": "whitespace"}) != ids({"aggregation": "first"})
