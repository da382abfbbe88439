"""Incremental planning: which (head, document) pairs need inference in this run.

One DuckDB pass per corpus file computes, for every row, the document id, a content fingerprint
(sha256 of the text plus the extra columns a head reads, e.g. its question column) and whether each
head's `where` routes it there. The fingerprints are compared with `doc_state` (what the database
already holds, per head, and from which model): only new or changed documents are inferred, unless
`full` is set. Duplicate ids are resolved here, over the whole corpus: the first occurrence wins,
a later one with different text is reported, a later identical one is skipped.

Heads that read upstream heads' results (`where = "topic.label = 'business'"`, `input = "english"`)
see each upstream head as one struct column per document, named after the head (its table's `upstream`);
the flow plans them after their upstream heads are loaded. A head reading a translation gets an input
file (staged Parquet of the rows to infer, translated text in the text column), so workers never
open the database.

The database is attached read-only, so planning never blocks readers for long and never writes. The
connection is sandboxed (storage.sandbox): each `where` must be one expression and is spliced as DuckDB
prints it; the connection can open only the corpus files (by their literal names: no globbing) and the
database. Ids become text through corpus.id_text, the form the loader's read_docs uses too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import duckdb
import pyarrow.parquet as pq

from core.names import quote
from core.tables import ResultTable

from .corpus import id_text
from .sandbox import check_expression, literal_path, sandboxed_connection
from .schema import upstream_sql


@dataclass(frozen=True)
class PlanHead:
    name: str
    where: str | None
    extra_columns: tuple[str, ...]
    model_id: str
    upstream: tuple[tuple[str, ResultTable], ...] = ()  # (head, its result table) this head's `where` or input reads
    input: str | None = None  # translation head whose output replaces the text column


@dataclass(frozen=True)
class WorkUnit:
    """Rows of one file to run through one head (at most `unit_docs` of them)."""

    path: str
    rows: tuple[int, ...]
    fingerprints: tuple[str | None, ...]
    # rows refused at planning time: (row, doc_id, reason)
    refused: tuple[tuple[int, str | None, str], ...] = ()
    # when `path` is a staged input file (translated text): the corpus file and row of each of `rows`
    source: str | None = None
    source_rows: tuple[int, ...] | None = None

    def source_row(self, row: int) -> int:
        return self.source_rows[row] if self.source_rows is not None else row

    @property
    def unit_id(self) -> str:
        first = (self.source_row(self.rows[0]) if self.rows else (self.refused[0][0] if self.refused else 0))
        return f"{Path(self.source or self.path).name}:{first}+{len(self.rows) + len(self.refused)}"


@dataclass
class HeadPlan:
    units: list[WorkUnit] = field(default_factory=list)
    routed: int = 0
    unchanged: int = 0
    to_infer: int = 0
    duplicates: int = 0  # identical repeats of an id, skipped
    conflicts: int = 0  # same id, different text: reported in failed_docs
    retried: int = 0  # of to_infer: failed before on the same text and model, tried again
    skipped_failed: int = 0  # failed before on the same text and model, not retried (terminal, or out of attempts)


def _fingerprint_sql(text: str, text_is_string: bool, extras: Sequence[str], present: set[str]) -> str:
    if not text_is_string:
        return "CAST(NULL AS VARCHAR)"
    parts = [text] + [f"coalesce(CAST({quote(c)} AS VARCHAR), '')" if c in present else "''" for c in extras]
    return "sha256(" + " || chr(0) || ".join(parts) + ")"


def create_upstream(con, upstream: Mapping[str, ResultTable]) -> None:
    """Temp tables up_0, up_1 ...: (doc_id, struct) per upstream head {name: result table}, read from
    the database attached as `results`."""
    for k, (name, table) in enumerate(upstream.items()):
        con.execute(f"CREATE TEMP TABLE up_{k} AS {upstream_sql(table)}", [name])


def source_sql(rows: str, upstream: Sequence[str], id_column: str) -> str:
    """Corpus rows (`rows`: a relation) with one struct column per upstream head, as relation `src`."""
    cols = "".join(f", up_{k}.s AS {quote(name)}" for k, name in enumerate(upstream))
    joins = "".join(f" LEFT JOIN up_{k} ON up_{k}.doc_id = {id_text('c.' + quote(id_column))}"
                    for k in range(len(upstream)))
    return f"(SELECT c.*{cols} FROM {rows} c{joins}) src"


def plan_work(database: str | None, files: Sequence[str], heads: Sequence[PlanHead], id_column: str,
              text_column: str, unit_docs: int, full: bool = False, inputs_dir: str | None = None,
              max_attempts: int = 3, retry_failed: bool = False) -> tuple[dict[str, HeadPlan], int, list[str]]:
    """Plan every head over `files` (already checked readable): (plans, rows scanned, file error lines).

    A document that failed before on the same text and model is tried again when its fault was
    transient and it has failed fewer than `max_attempts` times, or with `retry_failed` (or `full`).

    Runs sandboxed: the connection reads only `files` and the database; each `where` is checked to be
    one expression first (ValueError naming the head otherwise), whoever built the PlanHead."""
    routing = {}
    for h in heads:
        try:
            routing[h.name] = check_expression(h.where) if h.where else None
        except ValueError as exc:
            raise ValueError(f"heads.{h.name}.where: {exc}") from None
    database = database if database and Path(database).exists() else None
    con = sandboxed_connection(files, database)
    errors: list[str] = []
    try:
        has_state = False
        if database:
            has_state = bool(con.execute("SELECT 1 FROM duckdb_tables() WHERE database_name = 'results' "
                                         "AND table_name = 'doc_state'").fetchone())
        upstream = dict(u for h in heads for u in h.upstream)
        if upstream and not has_state:
            raise RuntimeError(f"upstream heads {', '.join(upstream)} have no results database yet")
        create_upstream(con, upstream)
        source = source_sql("read_parquet(?, file_row_number = true)", list(upstream), id_column)
        cols = ", ".join(f"fp_{i} VARCHAR, r_{i} BOOLEAN" for i in range(len(heads)))
        con.execute(f"CREATE TEMP TABLE scan (file_no INTEGER, row BIGINT, doc_id VARCHAR, {cols})")
        for file_no, path in enumerate(files):
            schema = pq.read_schema(path)
            present = set(schema.names)
            text_type = schema.field(text_column).type
            is_string = str(text_type) in ("string", "large_string", "string_view")
            exprs = []
            for i, h in enumerate(heads):
                text = f"{quote(h.input)}.text" if h.input else quote(text_column)
                exprs.append(_fingerprint_sql(text, is_string or bool(h.input), h.extra_columns, present)
                             + f" AS fp_{i}")
                exprs.append(f"coalesce({routing[h.name]}, false) AS r_{i}" if h.where else f"true AS r_{i}")
            try:
                con.execute(
                    f"INSERT INTO scan SELECT ?, file_row_number, {id_text(quote(id_column))}, {', '.join(exprs)} "
                    f"FROM {source}", [file_no, literal_path(path)])
            except duckdb.Error as exc:
                errors.append(f"{path}: cannot be planned ({str(exc).strip().splitlines()[0]})")
        retry = RetryRule(max_attempts, retry_failed or full)
        plans = {h.name: _plan_head(con, i, h, files, has_state, unit_docs, full, retry) for i, h in enumerate(heads)}
        for h in heads:
            if h.input:
                _stage_inputs(con, h, plans[h.name], source, id_column, text_column, Path(inputs_dir))
        (rows_scanned,) = con.execute("SELECT count(*) FROM scan").fetchone()
        return plans, rows_scanned, errors
    finally:
        con.close()


def _stage_inputs(con, head: PlanHead, plan: HeadPlan, source: str, id_column: str, text_column: str,
                  inputs_dir: Path) -> None:
    """Write the rows to infer, with the upstream translation as text, to one Parquet file per corpus file;
    the units then point at it (rows = positions) and remember the corpus file and rows for reports."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list[WorkUnit]] = {}
    for unit in plan.units:
        by_file.setdefault(unit.path, []).append(unit)
    units = []
    for path, file_units in by_file.items():
        wanted = sorted(r for u in file_units for r in u.rows)
        if not wanted:
            units.extend(file_units)
            continue
        present = set(pq.read_schema(path).names)
        extras = [c for c in head.extra_columns if c in present and c not in (id_column, text_column)]
        cols = ", ".join([f"{id_text('src.' + quote(id_column))} AS {quote(id_column)}",
                          f"{quote(head.input)}.text AS {quote(text_column)}"] + [f"src.{quote(c)}" for c in extras])
        table = con.sql(f"SELECT {cols} FROM {source} WHERE src.file_row_number IN (SELECT unnest(?)) "
                        "ORDER BY src.file_row_number", params=[literal_path(path), wanted]).to_arrow_table()
        out = inputs_dir / f"{head.name}-{hashlib.sha1(path.encode()).hexdigest()[:12]}.parquet"
        pq.write_table(table, out)
        position = {r: k for k, r in enumerate(wanted)}
        for u in file_units:
            units.append(WorkUnit(path=str(out), rows=tuple(position[r] for r in u.rows), fingerprints=u.fingerprints,
                                  refused=u.refused, source=path, source_rows=u.rows))
    plan.units = units


@dataclass(frozen=True)
class RetryRule:
    max_attempts: int = 3
    retry_all: bool = False  # --retry-failed / --full: every earlier failure is tried again


def _plan_head(con, i: int, head: PlanHead, files: Sequence[str], has_state: bool, unit_docs: int,
               full: bool, retry: RetryRule = RetryRule()) -> HeadPlan:
    if has_state:
        state_join = ("LEFT JOIN results.doc_state d ON d.head = $head AND d.doc_id = s.doc_id AND d.status = 'done' "
                      # the document's last failed attempt (plan-stage rows are about other occurrences)
                      "LEFT JOIN (SELECT doc_id, fingerprint, model_id, kind, coalesce(attempts, 1) AS attempts "
                      "  FROM results.failed_docs WHERE head = $head AND stage <> 'plan' AND doc_id IS NOT NULL "
                      "  QUALIFY row_number() OVER (PARTITION BY doc_id ORDER BY attempts DESC) = 1) f "
                      "ON f.doc_id = s.doc_id")
    else:
        state_join = ("LEFT JOIN (SELECT NULL::VARCHAR AS fingerprint, NULL::VARCHAR AS model_id) d ON false "
                      "LEFT JOIN (SELECT NULL::VARCHAR AS fingerprint, NULL::VARCHAR AS model_id, NULL::VARCHAR AS kind, "
                      "  NULL::INTEGER AS attempts) f ON false")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE classified AS
        WITH routed AS (
            SELECT file_no, row, doc_id, fp_{i} AS fp,
                   row_number() OVER w AS occurrence,
                   first_value(fp_{i}) OVER w AS first_fp,
                   first_value(file_no) OVER w AS first_file,
                   first_value(row) OVER w AS first_row
            FROM scan WHERE r_{i}
            WINDOW w AS (PARTITION BY doc_id ORDER BY file_no, row)
        ), judged AS (
            SELECT s.file_no, s.row, s.doc_id, s.fp,
                   CASE WHEN s.doc_id IS NULL OR s.occurrence = 1 THEN 'first'
                        WHEN s.fp IS NOT DISTINCT FROM s.first_fp THEN 'repeat'
                        ELSE 'conflict' END AS kind,
                   s.first_file, s.first_row,
                   coalesce(s.fp IS NOT NULL AND d.fingerprint = s.fp AND d.model_id = $model, false) AS unchanged,
                   coalesce(f.fingerprint IS NOT DISTINCT FROM s.fp AND f.model_id = $model, false) AS failed_before,
                   coalesce(f.kind = 'terminal' OR f.attempts >= $max_attempts, false) AS retries_spent
            FROM routed s {state_join}
        )
        SELECT * EXCLUDE (failed_before, retries_spent),
               failed_before AND NOT unchanged AS retry,
               failed_before AND NOT unchanged AND retries_spent AND NOT $retry_all AS held
        FROM judged""", {"model": head.model_id, "max_attempts": retry.max_attempts, "retry_all": retry.retry_all}
                | ({"head": head.name} if has_state else {}))
    counts = dict(con.execute("SELECT kind || CASE WHEN kind <> 'first' THEN '' WHEN unchanged THEN '-unchanged' "
                              "WHEN held THEN '-held' WHEN retry THEN '-retry' ELSE '' END, "
                              "count(*) FROM classified GROUP BY ALL").fetchall())
    # only the rows that need work come back to Python: memory follows the change, not the corpus
    rows = con.execute("SELECT file_no, row, doc_id, fp, kind, first_file, first_row, unchanged FROM classified "
                       "WHERE kind = 'conflict' OR (kind = 'first' AND (NOT unchanged OR ?) AND NOT held) "
                       "ORDER BY file_no, row", [full]).fetchall()
    plan = HeadPlan(routed=sum(counts.values()), duplicates=counts.get("repeat", 0),
                    unchanged=0 if full else counts.get("first-unchanged", 0),
                    retried=counts.get("first-retry", 0), skipped_failed=counts.get("first-held", 0))
    per_file: dict[int, list] = {}
    for file_no, row, doc_id, fp, kind, first_file, first_row, unchanged in rows:
        if kind == "conflict":
            plan.conflicts += 1
            reason = (f"duplicate id with different text (first seen in {Path(files[first_file]).name} "
                      f"row {first_row})")
            per_file.setdefault(file_no, []).append((row, doc_id, None, reason))
            continue
        plan.to_infer += 1
        per_file.setdefault(file_no, []).append((row, doc_id, fp, None))
    for file_no, items in per_file.items():
        for k in range(0, len(items), unit_docs):
            chunk = items[k:k + unit_docs]
            plan.units.append(WorkUnit(
                path=files[file_no],
                rows=tuple(r for r, _, _, reason in chunk if reason is None),
                fingerprints=tuple(fp for _, _, fp, reason in chunk if reason is None),
                refused=tuple((r, d, reason) for r, d, _, reason in chunk if reason is not None)))
    return plan
