"""Readable runs in the Prefect UI, checked in the Prefect API a served or deployed run reports to.

One corpus run (two heads, several units each) is shared by every assertion: the flow run is named
after the config, each unit's task run after its head and number, each head has a progress artifact
that reaches 100, each head's plan is one log line, and `infer_unit` retries an infrastructure fault
(a stale shared-filesystem handle) while a bug fails its unit at once, loudly. Apart from it: a slow
or refusing API moves the progress artifacts late, or logs a warning, and never holds up the work.
"""
from __future__ import annotations

import errno
import logging
import re
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _wait(what: str, read, ready, timeout: float = 30.0):
    """The API records task runs from events, asynchronously: poll until `ready(value)`."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            assert ready(value), f"{what} not in the API after {timeout} s: {value}"
            return value
        time.sleep(0.3)


def _corpus_and_config(config, docs: int, tiny_models, more_heads: str = "") -> None:
    """`docs` documents beside `config`, run by a topic head (and `more_heads`) two documents a unit."""
    rows = [{"id": f"d{i}", "text": f"Report {i}: Maria Lopez met the board of Acme in Paris."} for i in range(docs)]
    pq.write_table(pa.Table.from_pylist(rows), config.parent / "docs.parquet")
    config.write_text(f"""
corpus = "docs.parquet"
database = "r.duckdb"
unit_docs = 2

[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
""" + more_heads)


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory, tiny_models, prefect_harness):
    import flows.process_corpus as pc
    import tasks.inference as inference
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    root = tmp_path_factory.mktemp("ui")
    _corpus_and_config(root / "news_daily.toml", 5, tiny_models, f"""
[heads.people_2]
task = "ner"
model = "{tiny_models['ner']}"
""")
    calls: Counter = Counter()
    real = inference._infer

    def faulty(head, unit, head_cfg, *args):
        """Infrastructure fault once on topic's 2nd unit; a bug on people_2's 3rd unit, every time."""
        key = (head_cfg.name, unit.rows[0])
        calls[key] += 1
        if key == ("topic", 2) and calls[key] == 1:
            raise OSError(errno.ESTALE, "Stale file handle", str(root / "docs.parquet"))
        if key == ("people_2", 4):
            raise ZeroDivisionError("a bug in the head")
        return real(head, unit, head_cfg, *args)

    flow_logger = logging.getLogger("prefect.flow_runs")
    level = flow_logger.level
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "_infer", faulty)
        mp.setattr(pc, "infer_unit", pc.infer_unit.with_options(retry_delay_seconds=0))
        flow_logger.setLevel(logging.INFO)  # the session keeps Prefect's loggers at WARNING
        try:
            summary = pc.process_corpus(config_path=str(root / "news_daily.toml"))
        finally:
            flow_logger.setLevel(level)
    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    return summary, calls


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_flow_run_is_named_after_the_config(ui_run):
    summary, _ = ui_run
    with _client() as client:
        run = client.read_flow_run(summary["run_id"])
    assert re.fullmatch(r"news_daily-\d{8}-\d{6}", run.name), run.name


def test_task_runs_are_named_after_head_and_unit_and_only_infrastructure_faults_are_retried(ui_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    summary, calls = ui_run
    names = {f"infer-topic-{i}" for i in (1, 2, 3)} | {f"infer-people_2-{i}" for i in (1, 2, 3)}

    def infer_runs():
        """name -> (state, run count) of the flow run's infer task runs."""
        with _client() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["run_id"]])),
                                         limit=200)
        return {r.name: (r.state_type.value if r.state_type else None, r.run_count)
                for r in runs if r.name.startswith("infer-")}

    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    runs = _wait("the infer task runs, final", infer_runs,
                 lambda r: set(r) == names and all(state in final for state, _ in r.values()))
    # the stale handle was retried in the same task run (2 runs); the bug was not
    assert runs == {**{n: ("COMPLETED", 1) for n in names}, "infer-topic-2": ("COMPLETED", 2),
                    "infer-people_2-3": ("FAILED", 1)}
    assert calls[("topic", 2)] == 2 and calls[("people_2", 4)] == 1
    # and the bug is loud: the unit is reported, its document not marked done
    assert summary["status"] == "completed_with_errors"
    assert any("people_2 failed on rows docs.parquet:4+1" in e and "ZeroDivisionError" in e
               for e in summary["file_errors"]), summary["file_errors"]
    assert summary["heads"]["topic"]["done"] == 5 and summary["heads"]["people_2"]["done"] == 4


def test_each_head_has_a_progress_artifact_that_reaches_100(ui_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    summary, _ = ui_run
    with _client() as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[summary["run_id"]]), type=ArtifactFilterType(any_=["progress"])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"taskheads-progress-topic", "taskheads-progress-people-2"}
    assert [float(by_key[k].data) for k in sorted(by_key)] == [100.0, 100.0]
    assert "5/5 documents" in by_key["taskheads-progress-topic"].description
    # the unit that failed counts as finished, and its failure is said
    assert "1 unit failed" in by_key["taskheads-progress-people-2"].description


def test_each_heads_plan_is_one_log_line(ui_run):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    summary, _ = ui_run

    def plan_lines():
        with _client() as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["run_id"]])),
                                    limit=200)
        return sorted(log.message for log in logs if log.message.startswith("plan "))

    lines = _wait("plan log lines", plan_lines, lambda lines: len(lines) == 2)
    assert lines == [
        "plan people_2: 5 routed, 0 unchanged, 0 duplicates, 0 failed before and skipped; "
        "5 to infer (0 retried) in 3 units",
        "plan topic: 5 routed, 0 unchanged, 0 duplicates, 0 failed before and skipped; "
        "5 to infer (0 retried) in 3 units"]


def test_a_slow_prefect_api_does_not_hold_up_units_or_loads(tmp_path, tiny_models, prefect_harness):
    """Progress artifacts are published beside the work, not in its way: a 10M-document run stood still
    for ~25 s while the flow's thread waited on the API to move one. Here the API takes the first update
    and does not answer until every unit of the run is counted; then the last state it is sent is the
    final one."""
    import threading

    import flows.process_corpus as pc
    import prefect.artifacts as artifacts

    _corpus_and_config(tmp_path / "p.toml", 6, tiny_models)
    all_counted, held = threading.Event(), threading.Event()
    sent: list[tuple[float, str]] = []
    counted, answered = [], []

    def slow_update(artifact_id, progress, description=None, client=None):
        if not held.is_set():
            held.set()
            # before the fix the flow's own thread waits here, so no unit can be counted: a 20 s timeout
            answered.append(all_counted.wait(timeout=20))
        sent.append((progress, description))
        return artifact_id

    def counting_emit(event, **info):
        if event == "unit_done":
            counted.append(info)
            if len(counted) == 3:
                all_counted.set()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifacts, "update_progress_artifact", slow_update)
        mp.setattr(pc, "emit", counting_emit)
        summary = pc.process_corpus(config_path=str(tmp_path / "p.toml"))
    assert summary["heads"]["topic"]["done"] == 6 and summary["status"] == "completed"
    assert answered == [True], "the flow's thread waited on the progress artifact: no unit was counted meanwhile"
    assert sent[-1] == (100.0, "head `topic`: 6/6 documents, 3/3 units")


def test_a_progress_artifact_the_api_refuses_is_a_warning_not_a_failed_run(prefect_harness):
    """The updates run on their own thread: an API error there is logged to the flow run like one on
    the flow's thread, and the work goes on."""
    import prefect.artifacts as artifacts
    from prefect import flow

    from flows.artifact import ProgressArtifacts

    def refuse(**kwargs):
        raise RuntimeError("the API said no")

    @flow
    def counts():
        with ProgressArtifacts(every=0.01) as progress:
            progress.add("topic", docs=4, units=2)
            progress.unit_done("topic", 2)
            progress.unit_done("topic", 2)
        return progress.heads["topic"].description()

    class Kept(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    warnings, kept, flow_logger = [], Kept(logging.WARNING), logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(kept)  # Prefect's loggers do not propagate to pytest's
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(artifacts, "update_progress_artifact", refuse)
            assert counts() == "head `topic`: 4/4 documents, 2/2 units"
    finally:
        flow_logger.removeHandler(kept)
    assert warnings and all(w == "progress artifact of head topic not updated: RuntimeError: the API said no"
                            for w in warnings), warnings
