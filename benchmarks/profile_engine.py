"""Where the engine's time goes: torch profiler over the classification engine (all-MiniLM-L6-v2).

    .venv/bin/python benchmarks/profile_engine.py [--docs 300]

Prints the operators by self CPU time and the share spent in GEMMs (what the roofline measures).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "aten::baddbmm")


def main() -> None:
    import tempfile

    import run as bench
    from heads.base import Doc
    from heads.engine import pipe
    from heads.loading import load_head

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    args = ap.parse_args()
    texts = bench.corpus(args.docs)
    with tempfile.TemporaryDirectory() as d:
        paths = bench.models(Path(d))
        head = load_head("t", "classification", paths["all-MiniLM-L6-v2"])
        docs = [Doc(str(i), t) for i, t in enumerate(texts)]
        pipe(head, docs[:32])
        stats = {}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe(head, docs, stats=stats)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key.startswith(GEMM_OPS))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    print(f"GEMM share of self CPU time: {100 * gemm / total:.1f}%; fused attention: "
          f"{100 * attention / total:.1f}%; everything else: {100 * (total - gemm - attention) / total:.1f}%")
    print(f"padding: {stats['padded_tokens']:,} padded tokens for {stats['real_tokens']:,} real "
          f"({100 * (1 - stats['real_tokens'] / stats['padded_tokens']):.1f}% padding), {stats['batches']} batches")


if __name__ == "__main__":
    main()
