"""The Markdown artifact each corpus run publishes to Prefect: counts per head, throughput, failures,
labels, entities, QA no-answer rate (read back from the database it just loaded)."""
from __future__ import annotations

import contextvars
import threading
from datetime import datetime


def fmt(v) -> str:
    """A value as the run artifact and the HTML report show it."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _md(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_md(v) for v in r) + " |" for r in rows), ""]


def run_markdown(summary: dict, digest: dict) -> str:
    """Markdown body of one run's Prefect artifact: counts per head, throughput, what failed, what came out."""
    s, wall = summary, summary.get("wall_seconds") or 0.0
    inferred = sum(h["inferred"] for h in s["heads"].values())
    rate = f"{inferred / wall:.2f} docs/s" if wall > 0 else "–"
    out = [f"# Run `{s['run_id']}`: {s['status']}", "",
           f"database `{s['database']}` · docs read {s['docs_read']} from {s['files']} file(s) · "
           f"wall time {wall:.1f} s · throughput {rate} ({inferred} inferred (head, document) pairs)", ""]
    if s.get("recovered_rows"):
        out += [f"recovered {s['recovered_rows']} result rows staged by an interrupted run", ""]
    cols = ["routed", "unchanged", "duplicates", "inferred", "done", "failed", "rows", "seconds"]
    out += ["## Heads", "", *_md_table(["head", "task", *cols, "docs/s"], [
        [name, h["task"], *(h[c] for c in cols), h["inferred"] / h["seconds"] if h["seconds"] > 0 else None]
        for name, h in s["heads"].items()])]
    for name, h in s["heads"].items():
        if h.get("metrics"):
            out += [f"{name} against gold: " + ", ".join(f"{k} {_md(v)}" for k, v in h["metrics"].items()), ""]
    if digest["failures"]:
        out += ["## Failures", "", *_md_table(["head", "stage", "failed", "example reasons"], [
            [f["head"], f["stage"], f["failed"], "; ".join(f["examples"])] for f in digest["failures"]])]
    for head, labels in digest["labels"].items():
        out += [f"## Labels: {head}", "", *_md_table(["label", "docs", "share", "change vs previous run"], [
            [r["label"], r["n"], f"{r['share']:.1%}", None if r["delta"] is None else f"{100 * r['delta']:+.1f} pp"]
            for r in labels])]
    if digest["entities"]:
        out += ["## Entities", "", *_md_table(["head", "group", "entities"],
                                              [[e["head"], e["entity_group"], e["n"]] for e in digest["entities"]])]
    if digest["qa"]:
        out += ["## QA no-answer rate", "", *_md_table(["head", "answers", "no answer", "rate"], [
            [q["head"], q["answers"], q["no_answer"], f"{q['no_answer_rate']:.1%}"] for q in digest["qa"]])]
    if s["file_errors"]:
        out += ["## File errors", "", *(f"- {_md(e)}" for e in s["file_errors"]), ""]
    return "\n".join(out).rstrip() + "\n"


def publish_run_artifact(summary: dict) -> None:
    """A Markdown summary of the run in the Prefect UI (counts, throughput, labels, failures)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    try:
        from storage.report_data import run_digest

        create_markdown_artifact(key="taskheads-run", markdown=run_markdown(summary, run_digest(summary["database"],
                                 summary["run_id"])), description=f"taskheads run {summary['run_id']}")
    except Exception as exc:  # the results are loaded; a report problem must not fail the run
        get_run_logger().warning(f"run artifact not published: {type(exc).__name__}: {exc}")


def progress_key(head: str) -> str:
    """A head's progress artifact key (Prefect keys: lowercase letters, digits and dashes)."""
    return "taskheads-progress-" + head.lower().replace("_", "-")


class HeadProgress:
    """A head's counts of finished units, as its progress artifact shows them: what the CLI's progress
    bars show on a terminal, for served and deployed runs that have none.

    Counts documents of finished units, failed ones included (their failure is in the description)."""

    def __init__(self, head: str, docs: int, units: int) -> None:
        self.head, self.total, self.units = head, docs, units
        self.docs = self.finished = self.failed = 0
        self.id = None

    def percent(self) -> float:
        return 100.0 if self.finished == self.units else min(100.0, 100.0 * self.docs / max(self.total, 1))

    def description(self) -> str:
        failed = f", {self.failed} unit{'s' if self.failed != 1 else ''} failed" if self.failed else ""
        return (f"head `{self.head}`: {self.docs}/{self.total} documents, "
                f"{self.finished}/{self.units} units{failed}")


class ProgressArtifacts:
    """One progress artifact per head in the Prefect UI, moved from a thread of its own, at most every
    `every` seconds: the flow's thread only counts. Moving it there held up loading and the next unit
    for as long as the API took to answer (a 10M-document run stood still ~25 s on one update). The
    last counts are sent when the level ends (`close`). An artifact the API refuses is a warning,
    never a failed run."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.heads: dict[str, HeadProgress] = {}
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = None

    def add(self, head: str, docs: int, units: int) -> None:
        """Create the head's artifact (on the flow's thread, so that Prefect links it to the flow run)."""
        p = self.heads[head] = HeadProgress(head, docs, units)
        p.id = self._call(p, "create_progress_artifact", progress=p.percent(), key=progress_key(head),
                          description=p.description())

    def unit_done(self, head: str, docs: int, failed: bool = False) -> None:
        """Count a finished unit; the artifact follows within `every` seconds, without waiting on the API."""
        p = self.heads[head]
        with self._lock:
            p.docs += docs
            p.finished += 1
            p.failed += failed
            self._changed.add(head)
        if self._thread is None:
            ctx = contextvars.copy_context()  # the flow run's settings, client and logger
            self._thread = threading.Thread(target=ctx.run, args=(self._publish_loop,), daemon=True,
                                            name="taskheads-progress")
            self._thread.start()

    def close(self) -> None:
        """Send the last counts and stop the thread."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ProgressArtifacts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _publish_loop(self) -> None:
        while True:
            closing = self._closing.wait(self.every)
            self._publish()
            if closing:
                return

    def _publish(self) -> None:
        with self._lock:
            changed = [(p, p.percent(), p.description()) for p in map(self.heads.get, self._changed)]
            self._changed.clear()
        for p, percent, description in changed:
            if p.id is not None:
                self._call(p, "update_progress_artifact", artifact_id=p.id, progress=percent,
                           description=description)

    @staticmethod
    def _call(p: HeadProgress, name: str, **kwargs):
        from prefect import artifacts, get_run_logger

        try:
            return getattr(artifacts, name)(**kwargs)
        except Exception as exc:  # the UI's view of progress must not stop the work
            get_run_logger().warning(f"progress artifact of head {p.head} not updated: {type(exc).__name__}: {exc}")
            return None
