"""Backends (heads/backends): ONNX Runtime for encoder heads, CTranslate2 for translation.

References are independent of the backend code: the torch model through the same engine, and
`model.generate()` one document at a time."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from heads.base import Doc
from heads.engine import pipe
from heads.loading import ModelLoadError, load_head, model_identity
from pipeline.config import ConfigError, HeadConfig, parse_config
from taskheads.tiny_models import TOPIC_LABELS, build_bart, build_bert

TEXTS = ["Tony Blair met Microsoft in London on Monday.", "short", "",
         "the government said on monday that shares in the company rose sharply " * 12,
         "Ünïcode — 42% & émoji 🙂 and right-to-left שלום text.", "a b c d e f g h i j k l m n o p"]
DOCS = [Doc(str(i), t) for i, t in enumerate(TEXTS)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TASKHEADS_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("backend-models")
    return {**tiny_models, "multiple_choice": str(build_bert(root / "mc", "multiple_choice", max_len=64, seed=6)),
            "embedding": tiny_models["classification"],  # AutoModel: the encoder of the classifier
            # realistic initialisation (std 0.02): lossy precisions are meaningful on it
            "mt_init002": str(build_bart(root / "mt002", max_len=64, seed=4, init_range=0.02))}


PARAMS = {"classification": {}, "ner": {"aggregation": "simple"}, "qa": {"questions": ["Who met?", "Where?"]},
          "multiple_choice": {"choices": ["business", "politics", "sport news"]}, "embedding": {"normalize": False}}


def _numbers(rows) -> list[float]:
    """Every float of a document's rows, in order (scores, logits, vectors)."""
    out = []
    for r in rows:
        for k in sorted(r):
            v = r[k]
            if isinstance(v, float):
                out.append(v)
            elif isinstance(v, dict):
                out.extend(float(x) for _, x in sorted(v.items()))
            elif isinstance(v, (list, np.ndarray)) and len(v) and isinstance(v[0], (float, np.floating)):
                out.extend(float(x) for x in v)
    return out


def _strings(rows) -> list:
    return [{k: v for k, v in r.items() if isinstance(v, (str, int, bool)) or v is None} for r in rows]


@pytest.mark.parametrize("task", ["classification", "ner", "qa", "multiple_choice", "embedding"])
def test_onnxruntime_float32_matches_torch_through_pipe(models, task):
    ref = load_head("h", task, models[task], params=PARAMS[task])
    ort = load_head("h", task, models[task], params=PARAMS[task], backend="onnxruntime")
    assert type(ort.model).__name__ == "OrtModel" and ort.backend == "onnxruntime"
    a, b = pipe(ref, DOCS, token_budget=256), pipe(ort, DOCS, token_budget=256)
    for x, y in zip(a, b):
        assert (x.error, x.stage) == (y.error, y.stage)
        assert _strings(x.rows) == _strings(y.rows)  # labels, entity spans, answers, ranks
        nx, ny = _numbers(x.rows), _numbers(y.rows)
        assert len(nx) == len(ny)
        if nx:
            assert np.abs(np.array(nx) - np.array(ny)).max() <= 1e-4


def test_onnxruntime_int8_keeps_labels(models):
    ref = load_head("h", "classification", models["classification"])
    q = load_head("h", "classification", models["classification"], backend="onnxruntime", dtype="int8")
    rng = np.random.default_rng(0)
    words = "the government said shares rose sharply after a report while the minister promised funding".split()
    docs = [Doc(str(i), " ".join(rng.choice(words, size=int(rng.integers(3, 40))))) for i in range(200)]
    a = [r.rows[0] for r in pipe(ref, docs)]
    b = [r.rows[0] for r in pipe(q, docs)]
    agree = np.mean([x["label"] == y["label"] for x, y in zip(a, b)])
    diff = max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b) for k in x["scores"])
    assert agree >= 0.95, agree
    assert 0 < diff < 0.05  # quantized (not the float32 graph), and close


def test_onnxruntime_runs_beside_a_cpu_arena_the_process_registered_before(models, cache):
    """The sessions share one process-wide arena, registered by taskheads; a process whose own code
    registered one first still runs them, with the same outputs. Process-wide state: its own process."""
    import subprocess
    import sys

    code = f"""
import onnxruntime as ort
info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
from heads.base import Doc
from heads.engine import pipe
from heads.loading import load_head
docs = [Doc(str(i), t) for i, t in enumerate({TEXTS!r})]
ref = load_head("h", "classification", {models["classification"]!r})
got = load_head("h", "classification", {models["classification"]!r}, backend="onnxruntime")
a, b = pipe(ref, docs, token_budget=256), pipe(got, docs, token_budget=256)
assert all(x.rows[0]["label"] == y.rows[0]["label"] for x, y in zip(a, b))
assert max(abs(x.rows[0]["scores"][k] - y.rows[0]["scores"][k]) for x, y in zip(a, b) for k in x.rows[0]["scores"]) <= 1e-4
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_batch_tokens_auto_gives_onnxruntime_on_cpu_its_own_budget(models):
    """ONNX Runtime's fused kernels peak at smaller batches than torch's on CPU (1,024 tokens: +25-30% docs/s
    on short documents, measured in benchmarks/README.md): "auto" picks that budget for it, 4,096 for torch."""
    from heads.engine import auto_token_budget

    ref = load_head("h", "classification", models["classification"])
    ort = load_head("h", "classification", models["classification"], backend="onnxruntime")
    assert (auto_token_budget(ref), auto_token_budget(ort)) == (4096, 1024)
    stats: dict = {}
    got = pipe(ort, DOCS, token_budget="auto", stats=stats)
    assert stats["final_budget"] == 1024
    assert [r.rows[0]["label"] for r in got] == [r.rows[0]["label"] for r in pipe(ref, DOCS)]


def test_export_is_cached_and_redone_when_the_model_changes(models, tmp_path, cache):
    folder = tmp_path / "topic"
    shutil.copytree(models["classification"], folder)
    load_head("h", "classification", str(folder), backend="onnxruntime")
    exports = sorted(p for p in (cache / "onnx").iterdir())
    assert len(exports) == 1 and (exports[0] / "model.onnx").exists()
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    load_head("h", "classification", str(folder), backend="onnxruntime")  # reused, not exported again
    assert sorted((cache / "onnx").iterdir()) == exports
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp
    build_bert(folder, "classification", labels=TOPIC_LABELS, max_len=64, seed=11)  # other weights, same folder
    new = load_head("h", "classification", str(folder), backend="onnxruntime")
    assert len(list((cache / "onnx").iterdir())) == 2
    ref = load_head("h", "classification", str(folder))
    a, b = pipe(ref, DOCS[:2]), pipe(new, DOCS[:2])
    assert np.allclose(_numbers(a[0].rows), _numbers(b[0].rows), atol=1e-4)  # the new weights run, not the old


def test_concurrent_first_use_builds_one_complete_folder(cache):
    from heads.backends import cached_build

    started, seen = [], []

    def build(tmp: Path):
        started.append(tmp)
        (tmp / "part1").write_text("a")
        time.sleep(0.3)  # readers racing now must not see a half-written folder
        (tmp / "part2").write_text("b")

    def worker():
        folder = cached_build("demo", "k1", build)
        seen.append(sorted(p.name for p in folder.iterdir()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) >= 2  # they did race
    assert seen == [["complete", "part1", "part2"]] * 4
    assert [p.name for p in (cache / "demo").iterdir()] == ["k1"]  # no temporary folder left behind


def test_a_drifting_cached_export_is_refused_in_one_line(models, cache):
    load_head("h", "classification", models["classification"], backend="onnxruntime")
    other = load_head("h", "ner", models["ner"], backend="onnxruntime")  # another model's graph, same inputs
    [folder] = [f for f in (cache / "onnx").iterdir() if f != other.model.folder]
    shutil.copy(other.model.folder / "model.onnx", folder / "model.onnx")
    with pytest.raises(ModelLoadError) as err:
        load_head("topic", "classification", models["classification"], backend="onnxruntime")
    message = str(err.value)
    assert "\n" not in message and message.startswith("heads.topic.backend: ") and "drifts" in message
    assert str(folder) in message  # says what to delete


def test_ctranslate2_greedy_equals_torch_generate_alone(models):
    ref = load_head("mt", "translation", models["translation"], params={"max_new_tokens": 20})
    ct2 = load_head("mt", "translation", models["translation"], params={"max_new_tokens": 20}, backend="ctranslate2")
    assert type(ct2.model).__name__ == "Ct2Model"
    docs = [d for d in DOCS if d.text]
    # the reference: each segment through model.generate() alone (no batching at all)
    for d, r in zip(docs, pipe(ct2, docs, token_budget=256)):
        feats = ref.encode(d)
        outs = []
        for f in feats:
            with torch.inference_mode():
                row = ref.model.generate(torch.tensor([f.input_ids]), max_new_tokens=ref.max_new_tokens,
                                         num_beams=1, do_sample=False)[0].tolist()
            from heads.base import trim_generated
            outs.append(trim_generated(row, ref.eos_ids))
        assert r.error is None and r.rows == ref.decode(d, feats, outs)
    assert [r.rows for r in pipe(ct2, docs)] == [r.rows for r in pipe(ref, docs)]  # and the torch backend


@pytest.mark.parametrize("dtype", ["int8"])
def test_ctranslate2_lossy_precision_passes_its_probe_and_translates(models, dtype):
    ref = load_head("mt", "translation", models["mt_init002"], params={"max_new_tokens": 12})
    ct2 = load_head("mt", "translation", models["mt_init002"], params={"max_new_tokens": 12}, backend="ctranslate2",
                    dtype=dtype)
    docs = [d for d in DOCS if d.text]
    a, b = pipe(ref, docs), pipe(ct2, docs)
    assert all(r.error is None for r in b)
    assert sum(x.rows == y.rows for x, y in zip(a, b)) >= len(docs) // 2


def test_missing_extra_is_a_one_line_config_error(tmp_path, models, monkeypatch):
    import heads.backends as backends

    monkeypatch.setattr(backends, "installed", lambda b: b == "torch")
    raw = {"corpus": "c.parquet", "database": "r.duckdb",
           "heads": {"topic": {"task": "classification", "model": models["classification"], "backend": "onnxruntime"}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, tmp_path)
    assert str(err.value) == ("heads.topic.backend: onnxruntime is not installed: pip install 'taskheads[onnx]'")
    raw["heads"] = {"mt": {"task": "translation", "model": models["translation"], "backend": "ctranslate2"}}
    with pytest.raises(ConfigError, match=r"^heads\.mt\.backend: ctranslate2 is not installed: "
                                          r"pip install 'taskheads\[ct2\]'$"):
        parse_config(raw, tmp_path)
    # auto falls back to torch when nothing else is installed
    raw["heads"] = {"topic": {"task": "classification", "model": models["classification"], "backend": "auto"}}
    cfg = parse_config(raw, tmp_path)
    assert load_head("t", "classification", models["classification"], backend=cfg.heads[0].backend).backend == "torch"


@pytest.mark.parametrize("head,problem", [
    ({"task": "translation", "backend": "onnxruntime"}, "onnxruntime runs classification, ner, qa, multiple_choice, "
                                                        "embedding heads, not translation"),
    ({"task": "classification", "backend": "ctranslate2"}, "ctranslate2 runs translation heads, not classification"),
    ({"task": "classification", "backend": "onnxruntime", "dtype": "bfloat16"},
     "onnxruntime runs dtype float32 / int8, not 'bfloat16'"),
    ({"task": "classification", "backend": "tensorrt"}, "expected one of 'torch', 'onnxruntime', "
                                                        "'ctranslate2', 'auto', got str 'tensorrt'"),
])
def test_backend_that_cannot_serve_the_head_is_refused(tmp_path, models, head, problem):
    raw = {"corpus": "c.parquet", "database": "r.duckdb",
           "heads": {"h": {**head, "model": models[head["task"]]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, tmp_path)
    assert str(err.value) == f"heads.h.backend: {problem}"


def test_model_id_of_torch_is_unchanged_and_backends_get_their_own(models):
    path = models["classification"]
    cfg = HeadConfig(name="topic", task="classification", model=path)
    head = load_head("topic", "classification", path)
    folder = Path(path)
    h = hashlib.sha256()
    for p in sorted(list(folder.glob("*.safetensors")) + [folder / "config.json"]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    # the formula before backends existed (lineage of every stored result depends on it)
    old = hashlib.sha256(json.dumps(["classification", path, None, None, h.hexdigest(),
                                     {"long_text": "chunk", "stride": 64}, "float32"],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    torch_id = model_identity(cfg, head)
    # torch rows keep their id: the identity from files (no backend part), and the pre-identity-file
    # formula as the legacy id that maps old rows
    assert torch_id["legacy_model_id"] == old and torch_id["dtype"] == "float32"
    assert torch_id["model_id"] == model_identity(cfg)["model_id"]
    ort_cfg = HeadConfig(name="topic", task="classification", model=path, backend="onnxruntime")
    ort = model_identity(ort_cfg, load_head("topic", "classification", path, backend="onnxruntime"))
    ort8 = model_identity(HeadConfig(name="topic", task="classification", model=path, backend="onnxruntime",
                                     dtype="int8"),
                          load_head("topic", "classification", path, backend="onnxruntime", dtype="int8"))
    ids = {torch_id["model_id"], ort["model_id"], ort8["model_id"]}
    legacy = {torch_id["legacy_model_id"], ort["legacy_model_id"], ort8["legacy_model_id"]}
    assert len(ids) == 3 and len(legacy) == 3  # a backend's rows never map onto torch's old rows
    # `auto` is resolved before the id, from the config and the installed packages (no model loaded)
    auto = model_identity(HeadConfig(name="topic", task="classification", model=path, backend="auto"))
    assert auto["model_id"] == ort["model_id"] and auto["backend"] == "onnxruntime"
    assert (ort["dtype"], ort8["dtype"]) == ("float32@onnxruntime", "int8@onnxruntime")


def test_auto_backend_is_chosen_and_said_in_the_run_summary(tmp_path, models, prefect_harness):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.process_corpus import process_corpus
    from storage.db import connect
    from taskheads.cli import format_summary

    pq.write_table(pa.table({"id": [str(i) for i in range(len(TEXTS))], "text": TEXTS}), tmp_path / "c.parquet")
    (tmp_path / "p.toml").write_text(
        f'corpus = "c.parquet"\ndatabase = "r.duckdb"\n[heads.topic]\ntask = "classification"\n'
        f'model = "{models["classification"]}"\nbackend = "auto"\n'
        f'[heads.mt]\ntask = "translation"\nmodel = "{models["translation"]}"\nbackend = "auto"\nmax_new_tokens = 8\n')
    s = process_corpus(config_path=str(tmp_path / "p.toml"))
    assert s["heads"]["topic"]["backend"] == "onnxruntime" and s["heads"]["mt"]["backend"] == "ctranslate2"
    text = format_summary(s)
    assert 'topic: backend onnxruntime (backend = "auto": the fastest installed for classification)' in text
    assert 'mt: backend ctranslate2 (backend = "auto": the fastest installed for translation)' in text
    con = connect(str(tmp_path / "r.duckdb"))
    dtypes = dict(con.execute("SELECT head, dtype FROM models").fetchall())
    con.close()
    assert dtypes == {"topic": "float32@onnxruntime", "mt": "float32@ctranslate2"}
