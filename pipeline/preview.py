"""`taskheads run CONFIG --plan-only`: what a run would do, per head, without loading a model or
writing anything (the planner reads the database read-only; model ids come from the files)."""
from __future__ import annotations

import tempfile

from heads.identity import file_identity
from heads.registry import head_class
from storage.corpus import check_files, corpus_files
from storage.db import last_throughput
from storage.plan import PlanHead, preview_levels

from .config import PipelineConfig


def preview(cfg: PipelineConfig, full: bool = False, retry_failed: bool = False) -> list[dict]:
    """One row per head, in level order: routed, unchanged, to_infer (None: after its upstream runs),
    duplicates, conflicts, skipped_failed, retried, docs_per_second of its last run, estimate_seconds."""
    plan_heads, levels = {}, [list(level) for level in cfg.levels()]
    for h in cfg.heads:
        identity = file_identity(h)
        plan_heads[h.name] = PlanHead(h.name, cfg.routing(h), tuple(head_class(h.task).columns_for(identity["params"])),
                                      identity["model_id"], upstream=tuple((u, cfg.head(u).result_table)
                                                                           for u in cfg.upstream(h)),
                                      input=h.input, aliases=(identity["legacy_model_id"],))
    good, _ = check_files(corpus_files(cfg.corpus), [cfg.id_column, cfg.text_column])
    with tempfile.TemporaryDirectory(prefix="taskheads-plan-") as spill:  # writes nothing that stays
        planned = preview_levels(cfg.database, good, [[plan_heads[h.name] for h in level] for level in levels],
                                 cfg.id_column, cfg.text_column, cfg.unit_docs, full, cfg.max_attempts, retry_failed,
                                 memory_limit=cfg.memory_limit, temp_directory=spill)
    rates = last_throughput(cfg.database)
    rows = []
    for level, known in zip(levels, planned):
        for h in level:
            p = known[0][h.name] if known is not None else None
            rate = rates.get(h.name)
            todo = None if p is None else p.to_infer
            rows.append({"head": h.name, "routed": p and p.routed, "unchanged": p and p.unchanged, "to_infer": todo,
                         "duplicates": p and p.duplicates, "conflicts": p and p.conflicts,
                         "skipped_failed": p and p.skipped_failed, "retried": p and p.retried,
                         "docs_per_second": rate,
                         "estimate_seconds": todo / rate if rate and todo is not None else None})
    return rows


def format_preview(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["to_infer"] is None:
            lines.append(f"{r['head']}: planned after its upstream heads run (their results decide what it reads)")
            continue
        line = f"{r['head']}: routed {r['routed']}, unchanged {r['unchanged']}, to infer {r['to_infer']}"
        extra = [f"{r[k]} {label}" for k, label in (("duplicates", "duplicates"), ("conflicts", "conflicting ids"),
                                                     ("skipped_failed", "failed before, skipped"),
                                                     ("retried", "failed before, retried")) if r[k]]
        if extra:
            line += " (" + ", ".join(extra) + ")"
        if r["to_infer"] == 0:
            pass
        elif r["estimate_seconds"] is not None:
            line += f"; about {_duration(r['estimate_seconds'])} at {r['docs_per_second']:.1f} docs/s (its last run)"
        else:
            line += "; no earlier run to estimate the time from"
        lines.append(line)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
