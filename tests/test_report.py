"""Views, report queries, the run artifact and the HTML report, over a database the real flow wrote.

Three runs over three corpora with different vocabularies (so label shares move between runs); the
third run uses a new topic model. Expected values are computed here from the base tables, never from
the views or queries under test. The HTML is rendered in headless Chromium and its plots counted.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import types
import zlib
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import report_data as rd
from storage.db import connect, ensure_schema
from storage.views import create_views
from flows.artifact import run_markdown
from taskheads.report import build_report, main_report
from taskheads.tiny_models import TOPIC_LABELS, build_bert
from heads.registry import result_tables

TABLES = result_tables()  # every registered head's result table

CHROMIUM = "/usr/bin/chromium"
VOCAB = {
    "a": "Ada Lovelace founded Initech in Zurich . Shares rose 12 % after the merger with Globex and profits grew",
    "b": "The striker scored twice as United beat City ; the keeper saved a penalty before the final whistle",
    "c": "Parliament voted on the budget . The minister from Lagos said the election was close and taxes fall",
}
QUESTIONS = ["Who runs the company?", "Where is it?"]


def write_corpus(folder: Path, name: str, start_id: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = VOCAB[name].split()
    rows = [{"id": start_id + i, "text": " ".join(rng.choice(words, int(rng.integers(4, 30))))} for i in range(18)]
    if name == "a":
        rows.append({"id": start_id + 99, "text": "   "})  # fails at read: a failure for the report
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")


def write_config(path: Path, topic_model: str, models: dict) -> None:
    path.write_text(f"""
corpus = "a"
database = "results.duckdb"
unit_docs = 8

[heads.topic]
task = "classification"
model = "{topic_model}"

[heads.people]
task = "ner"
model = "{models['ner']}"
aggregation = "simple"

[heads.facts]
task = "qa"
model = "{models['qa']}"
questions = ["{QUESTIONS[0]}", "{QUESTIONS[1]}"]
max_seq_len = 128
doc_stride = 32
allow_no_answer = true
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models, prefect_harness):
    from flows.process_corpus import process_corpus

    root = tmp_path_factory.mktemp("report")
    for i, name in enumerate("abc"):
        write_corpus(root / name, name, start_id=1000 * i, seed=i)
    db = str(root / "results.duckdb")
    ensure_schema(db, tables=TABLES)
    con = connect(db)
    create_views(con, TABLES)  # before any run: views must follow the rows loaded later
    con.close()
    write_config(root / "v1.toml", tiny_models["classification"], tiny_models)
    new_topic = str(build_bert(root / "topic2", "classification", labels=TOPIC_LABELS, max_len=64, seed=11))
    write_config(root / "v2.toml", new_topic, tiny_models)
    runs = [process_corpus(config_path=str(root / "v1.toml"), corpus=str(root / "a")),
            process_corpus(config_path=str(root / "v1.toml"), corpus=str(root / "b")),
            process_corpus(config_path=str(root / "v2.toml"), corpus=str(root / "c"))]
    ensure_schema(db, tables=TABLES)
    con = connect(db)
    create_views(con, TABLES)  # again: must be harmless
    con.close()
    return types.SimpleNamespace(root=root, db=db, runs=runs, new_topic=new_topic, models=tiny_models)


def fetch(db: str, sql: str, params=()) -> list[dict]:
    con = duckdb.connect(db, read_only=True)
    try:
        cur = con.execute(sql, list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def expected_label_drift(db: str) -> dict[tuple, dict]:
    """(head, run_id, label) -> n, share, prev_share, delta, from classifications + runs in Python."""
    rows = fetch(db, "SELECT c.head, c.run_id, r.started_at, c.label FROM classifications c JOIN runs r USING (run_id)")
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    started = {}
    for r in rows:
        counts[r["head"]][r["run_id"]][r["label"]] += 1
        started[r["run_id"]] = r["started_at"]
    out = {}
    for head, per_run in counts.items():
        prev = None
        for run in sorted(per_run, key=lambda x: started[x]):
            total = sum(per_run[run].values())
            share = {label: n / total for label, n in per_run[run].items()}
            prev_share = {} if prev is None else {label: n / sum(prev.values()) for label, n in prev.items()}
            for label in set(share) | set(prev_share):
                p = None if prev is None else prev_share.get(label, 0.0)
                s = share.get(label, 0.0)
                out[(head, run, label)] = {"n": per_run[run].get(label, 0), "share": s, "prev_share": p,
                                           "delta": None if p is None else s - p}
            prev = per_run[run]
    return out


# --- views -------------------------------------------------------------------------------------------


def test_every_result_table_has_a_latest_view(built):
    names = {r["view_name"] for r in fetch(built.db, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert {f"latest_{t.name}" for t in TABLES} | {"label_drift"} <= names


def test_latest_views_show_only_the_latest_model_of_each_head(built):
    first, _, third = built.runs
    old, new = first["heads"]["topic"]["model_id"], third["heads"]["topic"]["model_id"]
    assert old != new
    base = fetch(built.db, "SELECT doc_id, model_id FROM classifications")
    assert {r["model_id"] for r in base} == {old, new}  # the old model's rows are still in the table
    latest = fetch(built.db, "SELECT * FROM latest_classifications")
    assert sorted(r["doc_id"] for r in latest) == sorted(r["doc_id"] for r in base if r["model_id"] == new)
    assert len(latest) == 18 and {r["run_id"] for r in latest} == {third["run_id"]}
    (run,) = fetch(built.db, "SELECT started_at FROM runs WHERE run_id = ?", [third["run_id"]])
    assert {(r["run_started_at"], r["model_source"], r["model_revision"]) for r in latest} == {
        (run["started_at"], built.new_topic, None)}
    # the people head kept its model: every entity row is current, lineage joined per row
    assert third["heads"]["people"]["model_id"] == first["heads"]["people"]["model_id"]
    ents = fetch(built.db, "SELECT e.* EXCLUDE (load_id), r.started_at AS run_started_at FROM entities e JOIN runs r USING (run_id) "
                           "ORDER BY ALL")
    latest_ents = fetch(built.db, "SELECT * EXCLUDE (model_source, model_revision) FROM latest_entities ORDER BY ALL")
    assert ents and latest_ents == ents
    assert fetch(built.db, "SELECT DISTINCT model_source FROM latest_entities") == [{"model_source": built.models["ner"]}]


def test_label_drift_matches_base_tables(built):
    expected = expected_label_drift(built.db)
    rows = fetch(built.db, "SELECT * FROM label_drift")
    assert {(r["head"], r["run_id"], r["label"]) for r in rows} == set(expected)
    assert len({r["run_id"] for r in rows}) == 3
    for r in rows:
        e = expected[(r["head"], r["run_id"], r["label"])]
        assert r["n"] == e["n"] and r["share"] == pytest.approx(e["share"])
        assert (r["prev_share"] is None) == (e["prev_share"] is None)
        if e["prev_share"] is not None:
            assert r["prev_share"] == pytest.approx(e["prev_share"]) and r["delta"] == pytest.approx(e["delta"])
    per_run = defaultdict(float)
    for r in rows:
        per_run[(r["head"], r["run_id"])] += r["share"]
    assert all(total == pytest.approx(1.0) for total in per_run.values())
    first = built.runs[0]["run_id"]
    assert all(r["prev_share"] is None and r["delta"] is None for r in rows if r["run_id"] == first)
    assert any(abs(r["delta"]) > 0.05 for r in rows if r["delta"] is not None), "corpora should move the label mix"


# --- report data ---------------------------------------------------------------------------------------


def test_runs_overview_counts_and_throughput(built):
    rows = rd.runs_overview(built.db)
    assert [r["run_id"] for r in rows] == [s["run_id"] for s in built.runs]
    for r, s in zip(rows, built.runs):
        inferred = sum(h["inferred"] for h in s["heads"].values())
        failed = sum(h["failed"] for h in s["heads"].values())
        assert (r["status"], r["docs_read"], r["docs_inferred"], r["docs_failed"]) == (s["status"], s["docs_read"],
                                                                                         inferred, failed)
        wall = (r["finished_at"] - r["started_at"]).total_seconds()
        assert r["wall_seconds"] == pytest.approx(wall) and r["docs_per_second"] == pytest.approx(inferred / wall)
    assert rows[0]["docs_read"] == 19 and rows[0]["docs_failed"] == 3  # the blank doc, once per head


def test_label_distribution_is_label_drift(built):
    expected = expected_label_drift(built.db)
    rows = rd.label_distribution(built.db)
    assert {(r["head"], r["run_id"], r["label"]): r["n"] for r in rows} == {k: v["n"] for k, v in expected.items()}


def test_top_entities_overall_and_per_group(built):
    counts = Counter((r["entity_group"], r["text"]) for r in fetch(built.db, "SELECT entity_group, text FROM entities"))
    assert len(counts) > 5, "the tiny NER model finds entities in this corpus"
    top = rd.top_entities(built.db, limit=5)
    assert len(top) == 5 and all(r["count"] == counts[(r["entity_group"], r["text"])] for r in top)
    left_out = [n for key, n in counts.items() if key not in {(r["entity_group"], r["text"]) for r in top}]
    assert [r["count"] for r in top] == sorted((r["count"] for r in top), reverse=True)
    assert min(r["count"] for r in top) >= max(left_out)
    by_group = rd.top_entities_by_group(built.db, limit=2)
    assert set(by_group) == {g for g, _ in counts}
    for group, rows in by_group.items():
        mine = sorted((n for (g, _), n in counts.items() if g == group), reverse=True)
        assert [r["count"] for r in rows] == mine[:2]


def test_qa_no_answer_rate_and_failures(built):
    answers = fetch(built.db, "SELECT run_id, head, answer FROM answers")
    by_run = defaultdict(lambda: [0, 0])
    for a in answers:
        by_run[(a["run_id"], a["head"])][0] += 1
        by_run[(a["run_id"], a["head"])][1] += a["answer"] in (None, "")
    rows = rd.qa_no_answer_rate(built.db)
    assert {(r["run_id"], r["head"]): [r["answers"], r["no_answer"]] for r in rows} == dict(by_run)
    assert all(r["no_answer_rate"] == pytest.approx(r["no_answer"] / r["answers"]) for r in rows)
    assert sum(r["answers"] for r in rows) == 54 * len(QUESTIONS)  # 3 corpora x 18 usable docs
    failed = Counter((f["run_id"], f["head"], f["stage"]) for f in fetch(built.db, "SELECT * FROM failed_docs"))
    assert {(r["run_id"], r["head"], r["stage"]): r["failed"] for r in rd.failures_by_stage(built.db)} == failed
    assert failed == {(built.runs[0]["run_id"], h, "read"): 1 for h in ("topic", "people", "facts")}


def test_run_digest_is_one_run(built):
    run = built.runs[2]["run_id"]
    d = rd.run_digest(built.db, run)
    labels = Counter(r["label"] for r in fetch(built.db, "SELECT label FROM classifications WHERE run_id = ?", [run]))
    assert {r["label"]: r["n"] for r in d["labels"]["topic"] if r["n"]} == dict(labels)
    groups = Counter((r["head"], r["entity_group"]) for r in
                     fetch(built.db, "SELECT head, entity_group FROM entities WHERE run_id = ?", [run]))
    assert {(e["head"], e["entity_group"]): e["n"] for e in d["entities"]} == dict(groups)
    answers = fetch(built.db, "SELECT answer FROM answers WHERE run_id = ?", [run])
    (qa,) = d["qa"]
    assert (qa["head"], qa["answers"], qa["no_answer"]) == ("facts", len(answers),
                                                            sum(a["answer"] in (None, "") for a in answers))
    assert d["failures"] == []
    first = rd.run_digest(built.db, built.runs[0]["run_id"])
    assert [(f["head"], f["stage"], f["failed"], f["examples"]) for f in first["failures"]] == [
        (h, "read", 1, ["whitespace-only text"]) for h in ("facts", "people", "topic")]


def test_run_markdown_has_the_summary_counts(built):
    summary = built.runs[0]
    md = run_markdown(summary, rd.run_digest(built.db, summary["run_id"]))
    assert md.startswith(f"# Run `{summary['run_id']}`: {summary['status']}")
    assert f"docs read {summary['docs_read']} from {summary['files']} file(s)" in md
    for name, h in summary["heads"].items():
        cells = [name, h["task"]] + [str(h[c]) for c in ("routed", "unchanged", "duplicates", "inferred", "done",
                                                         "failed", "rows")]
        assert "| " + " | ".join(cells) + " | " in md, name
    assert "| topic | read | 1 | whitespace-only text |" in md
    labels = Counter(r["label"] for r in fetch(built.db, "SELECT label FROM classifications WHERE run_id = ?",
                                               [summary["run_id"]]))
    for label, n in labels.items():
        assert f"| {label} | {n} | {n / sum(labels.values()):.1%} | – |" in md
    assert "## QA no-answer rate" in md and "## Entities" in md and "File errors" not in md
    second = built.runs[1]
    md2 = run_markdown(second, rd.run_digest(built.db, second["run_id"]))
    for (head, run, label), e in expected_label_drift(built.db).items():
        if run == second["run_id"]:
            assert f"| {label} | {e['n']} | {e['share']:.1%} | {100 * e['delta']:+.1f} pp |" in md2


# --- HTML ----------------------------------------------------------------------------------------------


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian chromium (apt-get install chromium) to test the report")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class PlotCounter(HTMLParser):
    """Per plot div (id starting "plot-"): plotly's <svg class="main-svg"> and drawn marks inside it."""
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str | None, bool]] = []  # per open element: its plot id, inside the legend
        self.svgs, self.marks = Counter(), Counter()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        plot, legend = self.stack[-1] if self.stack else (None, False)
        if tag == "div" and (a.get("id") or "").startswith("plot-"):
            plot = a["id"]
        classes = (a.get("class") or "").split()
        legend = legend or "legend" in classes
        if plot and tag == "svg" and "main-svg" in classes:
            self.svgs[plot] += 1
        if plot and not legend and tag == "g" and "point" in classes:
            self.marks[(plot, "bars")] += 1  # one per bar (markers of a line plot count here too)
        if plot and not legend and tag == "path" and "js-line" in classes:
            self.marks[(plot, "lines")] += 1  # one per drawn line
        if tag not in self.VOID:
            self.stack.append((plot, legend))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.stack:
            self.stack.pop()


def png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) without PIL: (h, w, channels)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, w * bpp + 1)
    img = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.uint8)
    for y in range(h):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # sub: running sum per channel
            row = (np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).ravel()
        elif kind == 2:
            row = line + prev
        else:  # average / paeth depend on the byte just decoded: sequential
            row, p = bytearray(line.tobytes()), prev.tobytes()
            for i in range(len(row)):
                a = row[i - bpp] if i >= bpp else 0
                b, c = p[i], (p[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    row[i] = (row[i] + ((a + b) >> 1)) & 255
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            row = np.frombuffer(bytes(row), dtype=np.uint8)
        img[y], prev = row, row
    return img.reshape(h, w, bpp)[:, :, :3]


EXPECTED_PLOTS = ["plot-labels-topic", "plot-drift-topic", "plot-entities", "plot-qa", "plot-throughput"]


@pytest.fixture(scope="module")
def report(built):
    out = built.root / "html" / "report.html"
    assert build_report(built.db, str(out)) == str(out)
    return out


def test_report_is_self_contained(report, built):
    text = report.read_text()
    assert text.count("<script src") == 0 and "cdn.plot.ly" not in text.split("</script>", 1)[1]
    assert text.count("* plotly.js v") == 1  # the bundle embedded once, not once per figure
    assert "3 runs" in text and built.db in text
    for run in built.runs:
        assert run["run_id"] in text  # runs table
    for plot in EXPECTED_PLOTS:
        assert f'id="{plot}"' in text


def test_report_renders_every_plot_in_chromium(report, built, tmp_path):
    dom = chromium(["--dump-dom", report.as_uri()], tmp_path).stdout
    parser = PlotCounter()
    parser.feed(dom)
    for plot in EXPECTED_PLOTS:
        assert parser.svgs[plot] >= 2, (plot, parser.svgs)  # plotly draws a main and an overlay svg
    assert set(parser.svgs) == set(EXPECTED_PLOTS)
    # the data is drawn: one bar per (label, run), one line per label, one bar per run ...
    labels = fetch(built.db, "SELECT DISTINCT label FROM classifications")
    entities = len(fetch(built.db, "SELECT DISTINCT entity_group, text FROM entities"))
    assert parser.marks[("plot-labels-topic", "bars")] == 3 * len(labels)
    assert parser.marks[("plot-drift-topic", "lines")] == len(labels)
    assert parser.marks[("plot-entities", "bars")] == min(15, entities)
    assert parser.marks[("plot-qa", "bars")] == 3 and parser.marks[("plot-throughput", "bars")] == 3


def test_report_screenshot_is_not_blank(report, tmp_path):
    png = tmp_path / "report.png"
    chromium([f"--screenshot={png}", "--window-size=1280,2400", report.as_uri()], tmp_path)
    shutil.copy(png, "/tmp/report-screenshot.png")
    pixels = png_pixels(png)
    assert pixels.shape[:2] == (2400, 1280)
    non_white = (pixels.min(axis=2) < 235).mean()
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert non_white > 0.03, non_white
    assert colours > 50, colours
    # plotly's default palette is drawn: the first trace colour (#636efa) fills some bars
    assert (np.abs(pixels.astype(int) - [0x63, 0x6E, 0xFA]).sum(axis=2) < 30).sum() > 500


def test_empty_database_gets_notes_not_plots(tmp_path, capsys):
    db = str(tmp_path / "empty.duckdb")
    ensure_schema(db, tables=TABLES)
    out = tmp_path / "empty.html"
    assert main_report(db, str(out)) == 0
    assert capsys.readouterr().out.strip() == f"report written: {out}"
    text = out.read_text()
    for note in ("no runs yet", "no classifications yet", "no entities yet", "no QA answers yet",
                 "no finished runs yet", "no failed documents yet"):
        assert note in text, note
    assert 'class="plotly-graph-div"' not in text and "0 runs" in text


def test_main_report_on_missing_database(tmp_path, capsys):
    assert main_report(str(tmp_path / "nope.duckdb"), str(tmp_path / "r.html")) == 2
    assert "database not found" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_no_answer_counts_null_and_empty_answers(tmp_path):
    """The tiny QA model always answers; rows written here cover NULL and empty answers too."""
    db = str(tmp_path / "qa.duckdb")
    ensure_schema(db, tables=TABLES)
    con = connect(db)
    create_views(con, TABLES)
    con.execute("INSERT INTO runs (run_id, started_at) VALUES ('r1', now())")
    con.executemany("INSERT INTO answers (head, doc_id, question, answer, run_id, model_id) VALUES (?, ?, ?, ?, ?, ?)",
                    [["facts", str(i), "q?", answer, "r1", "m"] for i, answer in enumerate([None, "", "Lagos", "x"])])
    con.close()
    (row,) = rd.qa_no_answer_rate(db)
    assert (row["answers"], row["no_answer"], row["no_answer_rate"]) == (4, 2, 0.5)
    assert rd.run_digest(db, "r1")["qa"] == [{"head": "facts", "answers": 4, "no_answer": 2, "no_answer_rate": 0.5}]
