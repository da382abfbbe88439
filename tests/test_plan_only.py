"""`taskheads run CONFIG --plan-only` (issue 16 item 5): per head the documents routed, unchanged and
to infer, with an estimate from the last run's throughput, and nothing written.

References: the counts come from the corpus rows themselves (which changed since the first run,
which are new, which repeat), and "nothing written" from the bytes of every file in the folder.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

LINE = re.compile(r"^(\w+): routed (\d+), unchanged (\d+), to infer (\d+)(.*)$")


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKHEADS_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-hash-cache"))


def _rows(n: int, changed=()) -> list[dict]:
    return [{"id": i, "text": f"document {i} about the budget" + (" (edited)" if i in changed else ""),
             "lang": "de" if i % 3 == 0 else "en"} for i in range(n)]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "prefect-home" not in p.parts}


def _plan_only(cfg: Path, *extra: str) -> dict[str, tuple]:
    proc = subprocess.run([str(Path(sys.executable).with_name("taskheads")), "run", str(cfg), "--plan-only", *extra],
                          capture_output=True, text=True, timeout=300, cwd=cfg.parent)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5))
    return out


def test_plan_only_counts_per_head_and_writes_nothing(tmp_path, tiny_models, prefect_harness):
    from flows.process_corpus import process_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(20)), corpus / "a.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
unit_docs = 8

[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
where = "lang = 'en'"

[heads.lang]
task = "language"
languages = ["en", "de"]
""")
    # before any run: everything routed is to infer, no database appears, no estimate
    before = _snapshot(tmp_path)
    first_plan = _plan_only(cfg)
    assert _snapshot(tmp_path) == before and not (tmp_path / "results.duckdb").exists()
    en = sum(r["lang"] == "en" for r in _rows(20))
    assert first_plan["topic"][:3] == (en, 0, en) and first_plan["lang"][:3] == (20, 0, 20)
    assert "no earlier run" in first_plan["topic"][3]

    process_corpus(config_path=str(cfg))
    # then: docs 1 and 2 edited, 5 new documents, and a repeat of doc 4 (same id and text) in a new file
    rows = _rows(20, changed={1, 2})
    pq.write_table(pa.Table.from_pylist(rows), corpus / "a.parquet")
    new = [{"id": i, "text": f"a new document {i}", "lang": "en" if i % 2 else "de"} for i in range(20, 25)]
    pq.write_table(pa.Table.from_pylist(new + [_rows(20)[4]]), corpus / "b.parquet")

    before = _snapshot(tmp_path)
    plan = _plan_only(cfg)
    assert _snapshot(tmp_path) == before  # the database (and every other file) byte for byte

    all_rows = [(r, "a") for r in rows] + [(r, "new") for r in new] + [(_rows(20)[4], "repeat")]
    for head, routed_rows in (("topic", [x for x in all_rows if x[0]["lang"] == "en"]), ("lang", all_rows)):
        changed = [r for r, kind in routed_rows if kind == "a" and r["id"] in (1, 2)]
        fresh = [r for r, kind in routed_rows if kind == "new"]
        repeat = [r for r, kind in routed_rows if kind == "repeat"]
        unchanged = len(routed_rows) - len(changed) - len(fresh) - len(repeat)
        routed, got_unchanged, to_infer, rest = plan[head]
        assert (routed, got_unchanged, to_infer) == (len(routed_rows), unchanged, len(changed) + len(fresh)), head
        assert "docs/s (its last run)" in rest and ("1 duplicates" in rest) == bool(repeat), (head, rest)

    # a run then does exactly what the plan said
    summary = process_corpus(config_path=str(cfg))
    for head in ("topic", "lang"):
        h = summary["heads"][head]
        assert (h["routed"], h["unchanged"], h["inferred"]) == plan[head][:3]
