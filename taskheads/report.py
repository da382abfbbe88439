"""Human-facing views of a results database: one offline HTML report, and the Markdown of a run's artifact.

The HTML embeds plotly.js once, so the file opens anywhere without network access.
"""
from __future__ import annotations

import html
import os
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from flows.artifact import fmt as _fmt
from storage import report_data as rd

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px 40px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; } .note { color: #777; font-style: italic; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
"""


def _run_label(started, run_id: str) -> str:
    """Category label for a run on an x axis: time plus id prefix (unique, readable)."""
    when = started.strftime("%m-%d %H:%M:%S") if started else "?"
    return f"{when} · {run_id[:8]}"


def _table(columns: list[str], rows: list[dict], text_cols: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{' class=text' if c in text_cols else ''}>{html.escape(_fmt(r.get(c)))}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _plot(fig, div_id: str) -> str:
    import plotly.io as pio

    div_id = re.sub(r"[^A-Za-z0-9_-]", "_", div_id)  # head names end up in an id and in JS
    fig.update_layout(height=380, margin=dict(l=60, r=20, t=40, b=60), template="plotly_white")
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, default_height="380px",
                       config={"displaylogo": False, "responsive": True})


def _label_matrix(rows: list[dict]) -> tuple[list[str], dict[str, list[float]], dict[str, list[int]]]:
    """Runs (x order) and share/n per label, 0 where a label is absent from a run."""
    runs = list(dict.fromkeys(_run_label(r["run_started_at"], r["run_id"]) for r in rows))
    share, count = defaultdict(lambda: [0.0] * len(runs)), defaultdict(lambda: [0] * len(runs))
    for r in rows:
        i = runs.index(_run_label(r["run_started_at"], r["run_id"]))
        share[str(r["label"])][i], count[str(r["label"])][i] = r["share"], r["n"]
    return runs, dict(sorted(share.items())), dict(sorted(count.items()))


def _label_sections(rows: list[dict]) -> tuple[str, str]:
    import plotly.graph_objects as go

    if not rows:
        empty = _note("no classifications yet")
        return empty, empty
    by_head = defaultdict(list)
    for r in rows:
        by_head[r["head"]].append(r)
    bars, lines = [], []
    for head, head_rows in sorted(by_head.items()):
        runs, share, count = _label_matrix(head_rows)
        stacked = go.Figure([go.Bar(name=label, x=runs, y=share[label], customdata=count[label],
                                    hovertemplate="%{x}<br>" + label + ": %{y:.1%} (%{customdata} docs)<extra></extra>")
                             for label in share])
        stacked.update_layout(barmode="stack", title=f"{head}: label share per run", yaxis_tickformat=".0%",
                              xaxis_type="category")
        bars.append(_plot(stacked, f"plot-labels-{head}"))
        if len(runs) < 2:
            lines.append(_note(f"no drift yet for {head}: one run"))
            continue
        drift = go.Figure([go.Scatter(name=label, x=runs, y=share[label], mode="lines+markers") for label in share])
        drift.update_layout(title=f"{head}: label share across runs", yaxis_tickformat=".0%", xaxis_type="category")
        lines.append(_plot(drift, f"plot-drift-{head}"))
    return "".join(bars), "".join(lines)


def _entities_section(database: str) -> str:
    import plotly.graph_objects as go

    top = rd.top_entities(database, limit=15)
    if not top:
        return _note("no entities yet")
    groups = sorted({r["entity_group"] for r in top})
    order = [f"{r['text']} ({r['entity_group']})" for r in reversed(top)]
    fig = go.Figure([go.Bar(name=g, orientation="h", x=[r["count"] for r in top if r["entity_group"] == g],
                            y=[f"{r['text']} ({g})" for r in top if r["entity_group"] == g]) for g in groups])
    fig.update_layout(title="most frequent entities", yaxis=dict(categoryorder="array", categoryarray=order))
    per_group = [{"entity_group": group, "most frequent": ", ".join(f"{r['text']} ({r['count']})" for r in rows)}
                 for group, rows in rd.top_entities_by_group(database, limit=5).items()]
    return _plot(fig, "plot-entities") + _table(["entity_group", "most frequent"], per_group,
                                                text_cols=("entity_group", "most frequent"))


def _qa_section(database: str) -> str:
    import plotly.graph_objects as go

    rows = rd.qa_no_answer_rate(database)
    if not rows:
        return _note("no QA answers yet")
    runs = list(dict.fromkeys(_run_label(r["run_started_at"], r["run_id"]) for r in rows))
    fig = go.Figure()
    for head in sorted({r["head"] for r in rows}):
        mine = [r for r in rows if r["head"] == head]
        fig.add_bar(name=head, x=[_run_label(r["run_started_at"], r["run_id"]) for r in mine],
                    y=[r["no_answer_rate"] for r in mine], customdata=[[r["no_answer"], r["answers"]] for r in mine],
                    text=[f"{r['no_answer_rate']:.0%} of {r['answers']}" for r in mine], textposition="outside",
                    hovertemplate="%{x}<br>%{y:.1%} (%{customdata[0]} of %{customdata[1]})<extra></extra>")
    fig.update_layout(title="QA no-answer rate per run (NULL or empty answer)", showlegend=True,
                      yaxis=dict(tickformat=".0%", range=[0, 1.1]),
                      xaxis=dict(type="category", categoryorder="array", categoryarray=runs))
    return _plot(fig, "plot-qa")


def _throughput_section(runs: list[dict]) -> str:
    import plotly.graph_objects as go

    timed = [r for r in runs if r["docs_per_second"] is not None]
    if not timed:
        return _note("no finished runs yet")
    fig = go.Figure(go.Bar(x=[_run_label(r["started_at"], r["run_id"]) for r in timed],
                           y=[r["docs_per_second"] for r in timed], customdata=[r["docs_inferred"] for r in timed],
                           text=[f"{r['docs_per_second']:.1f}" for r in timed], textposition="auto",
                           hovertemplate="%{x}<br>%{y:.2f} docs/s (%{customdata} inferred)<extra></extra>"))
    fig.update_layout(title="throughput: inferred (head, document) pairs per wall second", xaxis_type="category")
    return _plot(fig, "plot-throughput")


def build_report(database: str, out: str) -> str:
    """Write the HTML report of `database` to `out`; returns the path written."""
    from plotly.offline import get_plotlyjs

    runs = rd.runs_overview(database)
    labels, drift = _label_sections(rd.label_distribution(database))
    failures = rd.failures_by_stage(database)
    for r in failures:
        r["run"] = _run_label(r["run_started_at"], r["run_id"])
    run_cols = ["run_id", "started_at", "finished_at", "status", "docs_read", "docs_inferred", "docs_skipped",
                "docs_failed", "wall_seconds", "docs_per_second"]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        ("Runs", _table(run_cols, runs, text_cols=("run_id", "status")) if runs else _note("no runs yet")),
        ("Label distribution per run", labels),
        ("Label drift between runs", drift),
        ("Top entities", _entities_section(database)),
        ("QA no-answer rate", _qa_section(database)),
        ("Throughput", _throughput_section(runs)),
        ("Failures by stage", _table(["run", "head", "stage", "failed"], failures, text_cols=("run", "head", "stage"))
         if failures else _note("no failed documents yet")),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>taskheads report</title>"
            f"<style>{_STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>taskheads report</h1><p class='meta'>database <code>{html.escape(str(database))}</code> · "
            f"generated {generated} · {len(runs)} run{'s' if len(runs) != 1 else ''}</p>{body}</body></html>")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page, encoding="utf-8")
    return str(out)


def main_report(database: str, out: str) -> int:
    """CLI entry: 0 and the path on stdout; 2 for a missing or too new database; 1 when it cannot be read."""
    from storage.db import DatabaseBusy, SchemaTooNew, exists

    if not exists(database):  # a file, or a lake's catalog
        print(f"taskheads: database not found: {database}", file=sys.stderr)
        return 2
    try:
        import plotly  # noqa: F401  (an optional part of taskheads)
    except ImportError:
        print("taskheads: report needs the [report] extra (plotly): pip install 'taskheads[report]'", file=sys.stderr)
        return 2
    try:
        path = build_report(database, out)
    except SchemaTooNew as exc:
        print(f"taskheads: {exc}", file=sys.stderr)
        return 2
    except DatabaseBusy as exc:
        print(f"taskheads: {exc}; try again when the run's load finishes", file=sys.stderr)
        return 1
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"taskheads: report failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    print(f"report written: {path}")
    return 0
