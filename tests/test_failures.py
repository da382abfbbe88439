"""Failed documents: retried when the fault was transient, never at the cost of earlier good results;
systemic faults (a bug, a model that always raises) fail the run loudly instead of piling up failed rows.

Faults are injected with TASKHEADS_FAIL_DOCS (core/faults.py): the engine's real out-of-memory
path for a transient fault, a DocumentError for a terminal one.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

N_DOCS = 12
WORDS = "Ada Lovelace founded Initech in Zurich while Grace Hopper ran Globex from Lagos".split()


def fetch(db, sql, params=()):
    con = duckdb.connect(db, read_only=True)
    try:
        cur = con.execute(sql, list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    rows = [{"id": i, "text": " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(4 + i % 7))}
            for i in range(N_DOCS)]
    pq.write_table(pa.Table.from_pylist(rows), root / "docs.parquet")
    return root


def write_config(root, tiny_models, name, max_attempts=None, head_extra=""):
    extra = f"max_attempts = {max_attempts}\n" if max_attempts else ""
    cfg = root / f"{name}.toml"
    cfg.write_text(f'corpus = "docs.parquet"\ndatabase = "{name}.duckdb"\nunit_docs = 4\n{extra}'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n{head_extra}')
    return str(cfg), str(root / f"{name}.duckdb")


def run(cfg, monkeypatch, fail=None, **kw):
    from flows.process_corpus import process_corpus

    if fail:
        monkeypatch.setenv("TASKHEADS_FAIL_DOCS", fail)
    else:
        monkeypatch.delenv("TASKHEADS_FAIL_DOCS", raising=False)
    try:
        return process_corpus(config_path=cfg, **kw)
    finally:
        monkeypatch.delenv("TASKHEADS_FAIL_DOCS", raising=False)


def test_transient_failure_keeps_earlier_rows_and_next_run_retries_exactly_those(
        corpus, tiny_models, prefect_harness, monkeypatch):
    cfg, db = write_config(corpus, tiny_models, "transient")
    first = run(cfg, monkeypatch)
    assert first["heads"]["topic"]["done"] == N_DOCS
    before = {r["doc_id"]: r for r in fetch(db, "SELECT * FROM classifications")}

    # a model upgrade (here: new head params, so a new model id) during which two documents run out of memory
    write_config(corpus, tiny_models, "transient", head_extra="stride = 16\n")
    second = run(cfg, monkeypatch, fail="topic:3,7")
    h = second["heads"]["topic"]
    assert second["heads"]["topic"]["model_id"] != first["heads"]["topic"]["model_id"]
    assert (h["inferred"], h["done"], h["failed"]) == (N_DOCS, N_DOCS - 2, 2)
    assert second["status"] == "completed"  # document faults are not the run's fault
    failed = fetch(db, "SELECT doc_id, kind, attempts, stage, error FROM failed_docs ORDER BY doc_id")
    assert [(f["doc_id"], f["kind"], f["attempts"], f["stage"]) for f in failed] == [
        ("3", "transient", 1, "forward"), ("7", "transient", 1, "forward")]
    assert all("out of memory" in f["error"] for f in failed)
    # the earlier good results of the failed documents survived, with their lineage and doc_state
    after = {r["doc_id"]: r for r in fetch(db, "SELECT * FROM classifications")}
    assert set(after) == set(before)
    for d in ("3", "7"):
        assert after[d] == before[d]
    state = {r["doc_id"]: r for r in fetch(db, "SELECT doc_id, run_id, status FROM doc_state")}
    assert state["3"]["run_id"] == first["run_id"] and state["3"]["status"] == "done"
    assert state["0"]["run_id"] == second["run_id"]
    # the current-results view keeps showing them (the new model tried and failed), next to the new rows
    latest = {r["doc_id"]: r["run_id"] for r in fetch(db, "SELECT doc_id, run_id FROM latest_classifications")}
    assert set(latest) == {str(i) for i in range(N_DOCS)}
    assert latest["3"] == first["run_id"] and latest["0"] == second["run_id"]

    # the next ordinary run retries exactly the two failed documents
    third = run(cfg, monkeypatch)
    h = third["heads"]["topic"]
    assert (h["inferred"], h["retried"], h["done"], h["failed"], h["unchanged"]) == (2, 2, 2, 0, N_DOCS - 2)
    assert {r["doc_id"] for r in fetch(db, "SELECT doc_id FROM classifications WHERE run_id = ?",
                                       [third["run_id"]])} == {"3", "7"}
    assert fetch(db, "SELECT * FROM failed_docs") == []
    # and after that nothing is left to do
    assert run(cfg, monkeypatch)["heads"]["topic"]["inferred"] == 0


def test_transient_failures_stop_after_max_attempts_until_retry_failed(corpus, tiny_models, prefect_harness,
                                                                        monkeypatch):
    cfg, db = write_config(corpus, tiny_models, "attempts", max_attempts=2)
    first = run(cfg, monkeypatch, fail="topic:5")
    assert first["heads"]["topic"]["failed"] == 1
    second = run(cfg, monkeypatch, fail="topic:5")
    assert (second["heads"]["topic"]["inferred"], second["heads"]["topic"]["retried"]) == (1, 1)
    assert fetch(db, "SELECT kind, attempts FROM failed_docs") == [{"kind": "transient", "attempts": 2}]
    third = run(cfg, monkeypatch)  # attempts used up: counts as terminal, not retried
    assert third["heads"]["topic"]["inferred"] == 0
    assert third["heads"]["topic"]["skipped_failed"] == 1
    fourth = run(cfg, monkeypatch, retry_failed=True)
    assert (fourth["heads"]["topic"]["inferred"], fourth["heads"]["topic"]["done"]) == (1, 1)
    assert fetch(db, "SELECT * FROM failed_docs") == []
    assert {r["doc_id"] for r in fetch(db, "SELECT doc_id FROM classifications")} == {str(i) for i in range(N_DOCS)}


def test_terminal_failure_is_not_retried_until_text_changes_or_retry_failed(tmp_path, tiny_models,
                                                                             prefect_harness, monkeypatch):
    rows = [{"id": i, "text": f"document number {i} about Zurich"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    cfg, db = write_config(tmp_path, tiny_models, "terminal")
    first = run(cfg, monkeypatch, fail="topic:2:terminal")
    assert fetch(db, "SELECT doc_id, kind, attempts FROM failed_docs") == [
        {"doc_id": "2", "kind": "terminal", "attempts": 1}]
    assert first["heads"]["topic"]["failed"] == 1
    second = run(cfg, monkeypatch)
    assert second["heads"]["topic"]["inferred"] == 0 and second["heads"]["topic"]["skipped_failed"] == 1
    third = run(cfg, monkeypatch, fail="topic:2:terminal", retry_failed=True)
    assert third["heads"]["topic"]["inferred"] == 1 and third["heads"]["topic"]["retried"] == 1
    assert fetch(db, "SELECT attempts FROM failed_docs") == [{"attempts": 2}]
    rows[2]["text"] = "a corrected text about Zurich"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    fourth = run(cfg, monkeypatch)  # the text changed: a new document as far as the model is concerned
    assert (fourth["heads"]["topic"]["inferred"], fourth["heads"]["topic"]["done"]) == (1, 1)
    assert fourth["heads"]["topic"]["retried"] == 0
    assert fetch(db, "SELECT * FROM failed_docs") == []


def test_bug_in_decode_fails_the_run_loudly_not_every_document(tmp_path, tiny_models, prefect_harness,
                                                                monkeypatch, capsys):
    import heads.classification
    from taskheads.cli import main

    rows = [{"id": i, "text": f"document number {i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    cfg, db = write_config(tmp_path, tiny_models, "bug")

    def broken(*args, **kwargs):
        raise KeyError("a bug in decode")

    monkeypatch.setattr(heads.classification, "decode_classification", broken)
    status = main(["run", cfg, "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1
    assert "KeyError" in captured.out and "a bug in decode" in captured.out
    assert fetch(db, "SELECT * FROM failed_docs") == []  # not a pile of failed rows
    assert fetch(db, "SELECT count(*) AS n FROM doc_state")[0]["n"] == 0  # nothing marked processed
    (r,) = fetch(db, "SELECT status, file_errors FROM runs")
    assert r["status"] == "completed_with_errors" and any("a bug in decode" in e for e in r["file_errors"])


def test_bug_traceback_reaches_the_prefect_log(tmp_path, tiny_models, prefect_harness, monkeypatch):
    import heads.classification
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    rows = [{"id": i, "text": f"document number {i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    cfg, _ = write_config(tmp_path, tiny_models, "trace")

    def broken(*args, **kwargs):
        raise KeyError("traceback wanted")

    monkeypatch.setattr(heads.classification, "decode_classification", broken)
    summary = run(cfg, monkeypatch)
    assert summary["status"] == "completed_with_errors"
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["run_id"]])),
                                limit=200)
    text = "\n".join(l.message for l in logs)
    assert "Traceback (most recent call last)" in text and "traceback wanted" in text


def test_head_whose_every_document_failed_exits_1_with_the_common_reason(tmp_path, tiny_models, prefect_harness,
                                                                          monkeypatch, capsys):
    from taskheads.cli import main

    rows = [{"id": i, "text": f"document number {i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    cfg, db = write_config(tmp_path, tiny_models, "allfail")
    monkeypatch.setenv("TASKHEADS_FAIL_DOCS", "topic:*:terminal")
    status = main(["run", cfg, "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    assert "topic: all 5 documents failed" in out and "injected terminal fault" in out
    (r,) = fetch(db, "SELECT status FROM runs")
    assert r["status"] == "completed_with_errors"
