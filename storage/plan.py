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

Plans stream (`open_plan`): the classification and the work units are made in DuckDB tables of the
planning connection (its buffer pool bounded by `memory_limit`, spilling to `temp_directory`); the
units are then written to a Parquet file per head and the connection closes, so its buffer pool is
not held through the run. Units are read out a few at a time as the flow submits them, so Python
never holds an object per corpus row: the planner's memory does not grow with the corpus. Counts per
head come from SQL before any unit is read. `plan_work` is the same plan with every unit in a list
(small corpora, tests).

The database is attached read-only while planning and detached once the plan is made (the flow
then loads into it), so planning never blocks readers for long and never writes. The connection is
sandboxed (storage.sandbox): each `where` must be one expression and is spliced as DuckDB prints it;
the connection can open only the corpus files (by their literal names: no globbing) and the
database. Ids become text through corpus.id_text, the form the loader's read_docs uses too.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import duckdb
import pyarrow.parquet as pq

from core.memory import hand_back_freed
from core.names import quote
from core.tables import ResultTable

from . import lake
from .corpus import id_text
from .saved_dataset import short_name, source_name
from .sandbox import check_expression, literal_path, memory_bytes, sandboxed_connection
from .schema import upstream_sql


# work units read from a plan at once: one row group of its spilled units file
UNITS_PER_READ = 16

# errors of a file's scan that are not the file's fault (memory, interrupts, DuckDB's own bugs): they fail
# the run instead of naming the file as unplannable and running the rest without it
NOT_THE_FILES_FAULT = (duckdb.OutOfMemoryException, duckdb.InterruptException, duckdb.FatalException,
                       duckdb.InternalException)


@dataclass(frozen=True)
class PlanHead:
    name: str
    where: str | None
    extra_columns: tuple[str, ...]
    model_id: str
    upstream: tuple[tuple[str, ResultTable], ...] = ()  # (head, its result table) this head's `where` or input reads
    input: str | None = None  # translation head whose output replaces the text column
    aliases: tuple[str, ...] = ()  # earlier ids of the same model (identity version 1): their results count


@dataclass(frozen=True)
class WorkUnit:
    """Rows of one file to run through one head (at most `unit_docs` of them)."""

    path: str
    rows: tuple[int, ...]
    fingerprints: tuple[str | None, ...]
    # rows refused at planning time: (row, doc_id, reason)
    refused: tuple[tuple[int, str | None, str], ...] = ()
    # what reports name: the corpus file and row of each of `rows` when `path` is a staged input file
    # (translated text); the saved dataset folder when `path` is its cached export (rows are its rows)
    source: str | None = None
    source_rows: tuple[int, ...] | None = None
    # where the documents' earlier rows are (storage.schema, load_id): the loads that wrote them (None
    # for rows from before load ids), the last load the plan saw, and the plan. `replaces` None: not known
    # (a database not migrated yet), so a load searches all of the head's rows. On a lake, the snapshot
    # the plan read too (other processes commit meanwhile, not in load id order).
    replaces: tuple[int | None, ...] | None = None
    planned_after: int = 0
    plan_id: str | None = None
    planned_snapshot: int | None = None

    def source_row(self, row: int) -> int:
        """The corpus row of `row` (one of `rows`: a position in the staged input file, if staged)."""
        return self.source_rows[self.rows.index(row)] if self.source_rows is not None else row

    @property
    def unit_id(self) -> str:
        first = (self.source_row(self.rows[0]) if self.rows else (self.refused[0][0] if self.refused else 0))
        return f"{Path(self.source or self.path).name}:{first}+{len(self.rows) + len(self.refused)}"


@dataclass
class HeadPlan:
    units: list[WorkUnit] = field(default_factory=list)  # filled by plan_work only; open_plan streams them
    routed: int = 0
    unchanged: int = 0
    to_infer: int = 0
    duplicates: int = 0  # identical repeats of an id, skipped
    conflicts: int = 0  # same id, different text: reported in failed_docs
    retried: int = 0  # of to_infer: failed before on the same text and model, tried again
    skipped_failed: int = 0  # failed before on the same text and model, not retried (terminal, or out of attempts)
    n_units: int = 0


def _fingerprint_sql(text: str, text_is_string: bool, extras: Sequence[str], present: set[str]) -> str:
    if not text_is_string:
        return "CAST(NULL AS VARCHAR)"
    parts = [text] + [f"coalesce(CAST({quote(c)} AS VARCHAR), '')" if c in present else "''" for c in extras]
    return "sha256(" + " || chr(0) || ".join(parts) + ")"


def fingerprint_halves(hex_sql: str, name: str) -> str:
    """A fingerprint's first 128 bits (32 hex digits) as two UBIGINT columns `<name>_hi`, `<name>_lo`: 16 bytes a
    row instead of a 64-character string, so plans of millions of documents sort, join and spill narrow.
    Stored fingerprints are these 32 digits (`fingerprint_text`); the 64-digit ones of earlier versions
    compare by their first 32. A value that is not hex (NULL included) gives NULLs: never unchanged."""
    return ", ".join(f"TRY_CAST('0x' || substr({hex_sql}, {start}, 16) AS UBIGINT) AS {name}_{half}"
                     for start, half in ((1, "hi"), (17, "lo")))


def fingerprint_text(name: str) -> str:
    """The stored form (32 lower-case hex digits) of fingerprint halves `<name>_hi`, `<name>_lo`."""
    return f"CASE WHEN {name}_hi IS NOT NULL THEN printf('%016x%016x', {name}_hi, {name}_lo) END"


def _same(a: str, b: str) -> str:
    """SQL: fingerprints `a` and `b` (halves) are the same (NULL halves: only with NULL)."""
    return f"({a}_hi IS NOT DISTINCT FROM {b}_hi AND {a}_lo IS NOT DISTINCT FROM {b}_lo)"


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


@dataclass(frozen=True)
class RetryRule:
    max_attempts: int = 3
    retry_all: bool = False  # --retry-failed / --full: every earlier failure is tried again


class LevelPlan:
    """The plan of one level's heads, open: counts per head (`heads`) at once, work units read from the
    plan's spilled units on demand (`units`). Close it (or use `with`) when the level is done."""

    def __init__(self, con, files: Sequence[str], heads: Sequence[PlanHead], plans: dict[str, HeadPlan],
                 rows_scanned: int, errors: list[str], staged: dict[str, dict[int, str]],
                 planned_after: int | None = None, spill_dir: str | None = None, with_units: bool = True,
                 planned_snapshot: int | None = None):
        self.con, self.files, self.rows_scanned, self.errors = con, list(files), rows_scanned, errors
        # the last load this plan saw (None: the database has no load ids yet), the plan's id, and on a
        # lake the snapshot it read
        self.planned_after, self.plan_id = planned_after, uuid.uuid4().hex
        self.planned_snapshot = planned_snapshot
        self.heads = plans
        self._index = {h.name: i for i, h in enumerate(heads)}
        self._staged = staged  # head -> file_no -> staged input file (heads with `input`)
        self._sources: dict[int, str] = {}  # file_no -> what reports name (read once, for files with units)
        self._unit_files: dict[str, Path] | None = None  # head -> its units, spilled out of the connection
        self._units_dir: Path | None = None
        try:
            if with_units:
                self._spill_units(spill_dir)
        except BaseException:
            self.close()
            raise
        finally:
            con.close()  # its buffer pool (up to memory_limit, the work tables') goes back before units run

    def _spill_units(self, spill_dir: str | None) -> None:
        """Write each head's work units to a Parquet file, one row group per `UNITS_PER_READ` units (what
        `units` reads at once), in a folder of the plan's own beside `spill_dir` (DuckDB's, which it removes
        with all in it when it closes; without one, in the system's temporary folder), so that the planning
        connection can close: otherwise its buffer pool stays full of work tables for the whole run."""
        self._unit_files = {}
        todo = [(name, i) for name, i in self._index.items() if self.heads[name].n_units]
        if not todo:
            return
        beside = Path(spill_dir).parent if spill_dir else None
        if beside is not None:
            beside.mkdir(parents=True, exist_ok=True)
        self._units_dir = Path(tempfile.mkdtemp(prefix="plan-units-", dir=beside))
        for name, i in todo:
            path = self._units_dir / f"{i}.parquet"
            self._unit_files[name] = path
            writer = None
            try:
                for lo in range(0, self.heads[name].n_units, UNITS_PER_READ):
                    chunk = self.con.execute(
                        f"SELECT unit_no, file_no, row, doc_id, {fingerprint_text('fp')} AS fp, conflict, first_file, "
                        f"first_row, pos, file_staged, had_state, prev_load FROM work_{i} "
                        f"WHERE unit_no >= ? AND unit_no < ? ORDER BY unit_no, row",
                        [lo, lo + UNITS_PER_READ]).to_arrow_table()
                    writer = writer or pq.ParquetWriter(path, chunk.schema)
                    writer.write_table(chunk, row_group_size=max(1, chunk.num_rows))
                    del chunk
                    # what glibc keeps of the memory DuckDB freed reading the spilled work table goes back, chunk by
                    # chunk: otherwise it piles up with the corpus (planning 10M rows for three heads peaked at
                    # 641 MB without this, 556 MB with; 100k rows: 524, 507)
                    hand_back_freed()
            finally:
                if writer is not None:
                    writer.close()
            self.con.execute(f"DROP TABLE work_{i}")

    def units_file(self, head: str) -> Path | None:
        """The Parquet file the head's units were spilled to (None: the head has none), one row per document:
        unit_no, file_no, row, doc_id, fp (its fingerprint as stored), conflict, ... (a benchmark seeds
        `doc_state` from it)."""
        return (self._unit_files or {}).get(head)

    def units(self, head: str) -> Iterator[WorkUnit]:
        """The head's work units in order, read from its spilled file `UNITS_PER_READ` units at a time."""
        if self._unit_files is None:
            raise RuntimeError("this plan was opened for its counts only: it has no units to read")
        if head not in self._unit_files:
            return
        staged = self._staged.get(head)
        units = pq.ParquetFile(self._unit_files[head], memory_map=False)
        for k in range(units.num_row_groups):
            chunk = units.read_row_group(k)  # columnar; each unit becomes Python objects only as it is asked for
            unit_no = chunk.column("unit_no").to_pylist()
            starts = [0, *(j for j in range(1, len(unit_no)) if unit_no[j] != unit_no[j - 1]), len(unit_no)]
            for lo, hi in zip(starts, starts[1:]):
                part = chunk.slice(lo, hi - lo)
                # (a list, not a generator, behind `*`: CPython grows a tuple from a generator in place, which fails
                # with SystemError when another thread holds it meanwhile, e.g. through gc.get_objects())
                yield self._unit(list(zip(*[column.to_pylist() for column in part.columns])), staged)

    def _source(self, file_no: int) -> str:
        """The file as reports name it: a saved dataset's export names its folder."""
        if file_no not in self._sources:
            self._sources[file_no] = source_name(self.files[file_no])
        return self._sources[file_no]

    def _unit(self, items: list[tuple], staged: dict[int, str] | None) -> WorkUnit:
        file_no = items[0][1]
        path, source = self.files[file_no], self._source(file_no)
        todo = [r for r in items if not r[5]]
        refused = tuple((row, doc_id, f"duplicate id with different text (first seen in "
                                      f"{short_name(self.files[first_file])} row {first_row})")
                        for _, _, row, doc_id, _, conflict, first_file, first_row, *_ in items if conflict)
        where = {"replaces": None, "planned_after": self.planned_after or 0, "plan_id": self.plan_id,
                 "planned_snapshot": self.planned_snapshot}
        if self.planned_after is not None:  # the loads holding the documents' earlier rows (None: older rows)
            where["replaces"] = tuple(sorted({r[11] for r in todo if r[10]}, key=lambda x: (x is not None, x)))
        if staged is not None and items[0][9]:
            return WorkUnit(path=staged[file_no], rows=tuple(r[8] for r in todo), fingerprints=tuple(r[4] for r in todo),
                            refused=refused, source=source, source_rows=tuple(r[2] for r in todo), **where)
        return WorkUnit(path=path, rows=tuple(r[2] for r in todo), fingerprints=tuple(r[4] for r in todo),
                        refused=refused, source=source if source != path else None, **where)

    def close(self) -> None:
        """Remove the spilled units (the planning connection closed when the plan was made)."""
        if self._units_dir is not None:
            shutil.rmtree(self._units_dir, ignore_errors=True)

    def __enter__(self) -> "LevelPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_plan(database: str | None, files: Sequence[str], heads: Sequence[PlanHead], id_column: str,
              text_column: str, unit_docs: int, full: bool = False, inputs_dir: str | None = None,
              max_attempts: int = 3, retry_failed: bool = False, memory_limit: str | None = None,
              temp_directory: str | None = None, with_units: bool = True) -> LevelPlan:
    """Plan every head over `files` (already checked readable): an open plan whose units wait in a Parquet
    file per head (`with_units`; without it, counts only) until it is closed.

    A document that failed before on the same text and model is tried again when its fault was
    transient and it has failed fewer than `max_attempts` times, or with `retry_failed` (or `full`).
    Heads with an `input` get their input files staged under `inputs_dir` (without it, only their
    counts are planned: `taskheads run --plan-only` writes nothing).

    Runs sandboxed: the connection reads only `files` and the database; each `where` is checked to be
    one expression first (ValueError naming the head otherwise), whoever built the PlanHead."""
    routing = {}
    for h in heads:
        try:
            routing[h.name] = check_expression(h.where) if h.where else None
        except ValueError as exc:
            raise ValueError(f"heads.{h.name}.where: {exc}") from None
    database = database if database and (lake.exists(database) if lake.is_lake(database) else Path(database).exists()) else None
    con = sandboxed_connection(files, database, memory_limit=memory_limit, temp_directory=temp_directory)
    errors: list[str] = []
    try:
        has_state, planned_after, planned_snapshot = False, None, None
        if database:
            if lake.is_lake(database):  # first: what commits after it, a load also searches (storage.db.replaced_loads)
                planned_snapshot = lake.current_snapshot(con, "results")
            has_state = bool(con.execute("SELECT 1 FROM duckdb_tables() WHERE database_name = 'results' "
                                         "AND table_name = 'doc_state'").fetchone())
            planned_after = _last_load(con)  # read before doc_state: a later load has a larger id
        else:
            planned_after = 0  # no database yet: no earlier rows anywhere
        heads = [replace(h, aliases=_live_aliases(con, h) if has_state else ()) for h in heads]
        upstream = dict(u for h in heads for u in h.upstream)
        if upstream and not has_state:
            raise RuntimeError(f"upstream heads {', '.join(upstream)} have no results database yet")
        create_upstream(con, upstream)
        source = source_sql("read_parquet(?, file_row_number = true)", list(upstream), id_column)
        # heads reading the same text and extra columns share one fingerprint column (hashed once)
        read = list(dict.fromkeys((h.input, h.extra_columns) for h in heads))
        fp_of = [read.index((h.input, h.extra_columns)) for h in heads]
        cols = ", ".join([f"fp_{k}_hi UBIGINT, fp_{k}_lo UBIGINT" for k in range(len(read))]
                         + [f"r_{i} BOOLEAN" for i in range(len(heads))])
        con.execute(f"CREATE TEMP TABLE scan (file_no INTEGER, row BIGINT, doc_id VARCHAR, {cols})")
        for file_no, path in enumerate(files):
            schema = pq.read_schema(path)
            present = set(schema.names)
            text_type = schema.field(text_column).type
            is_string = str(text_type) in ("string", "large_string", "string_view")
            exprs, narrow = [], []
            for k, (upstream_input, extras) in enumerate(read):
                text = f"{quote(upstream_input)}.text" if upstream_input else quote(text_column)
                exprs.append(_fingerprint_sql(text, is_string or bool(upstream_input), extras, present) + f" AS fp_{k}")
                narrow.append(fingerprint_halves(f"fp_{k}", f"fp_{k}"))
            for i, h in enumerate(heads):
                exprs.append(f"coalesce({routing[h.name]}, false) AS r_{i}" if h.where else f"true AS r_{i}")
                narrow.append(f"r_{i}")
            try:
                con.execute(
                    f"INSERT INTO scan SELECT file_no, row, doc_id, {', '.join(narrow)} FROM ("
                    f"SELECT ? AS file_no, file_row_number AS row, {id_text(quote(id_column))} AS doc_id, "
                    f"{', '.join(exprs)} FROM {source})", [file_no, literal_path(path)])
            except duckdb.Error as exc:
                if isinstance(exc, duckdb.OutOfMemoryException):  # the machine's limit, not the file: loud
                    raise _out_of_memory(exc, f"at {short_name(path)}", memory_limit) from exc
                if isinstance(exc, NOT_THE_FILES_FAULT):  # a fault of this process or of DuckDB itself: loud
                    raise
                errors.append(f"{path}: cannot be planned ({str(exc).strip().splitlines()[0]})")
        retry = RetryRule(max_attempts, retry_failed or full)
        plans = {}
        (rows_scanned,) = con.execute("SELECT count(*) FROM scan").fetchone()
        passes = _passes(con, rows_scanned)
        for i, h in enumerate(heads):
            try:
                plans[h.name] = _plan_head(con, i, fp_of[i], h, has_state, unit_docs, full, retry,
                                           planned_after is not None, passes)
            except duckdb.OutOfMemoryException as exc:  # a pass's joins and windows beyond the limit (below
                # ~22 MiB, more passes do not help: DuckDB's own needs)
                raise _out_of_memory(exc, f"on head {h.name}", memory_limit, f"{rows_scanned:,} rows scanned") from exc
            hand_back_freed()  # (as in _spill_units) what the head's statements freed, before the next head's
        con.execute("DROP TABLE scan")
        staged: dict[str, dict[int, str]] = {}
        for i, h in enumerate(heads):
            if h.input and inputs_dir:
                staged[h.name] = _stage_inputs(con, i, h, files, source, id_column, text_column, Path(inputs_dir))
        if database:
            con.execute("DETACH results")  # the flow writes the database next; the plan needs it no more
        return LevelPlan(con, files, heads, plans, rows_scanned, errors, staged, planned_after, temp_directory,
                         with_units, planned_snapshot)
    except BaseException:
        con.close()
        raise


def _out_of_memory(exc: duckdb.OutOfMemoryException, where: str, memory_limit: str | None,
                   detail: str = "") -> duckdb.OutOfMemoryException:
    """The planner's out-of-memory error as a config can act on it: where, the limit and the remedy, in place of
    DuckDB's advice (threads, insertion order) that a config does not reach. Still an OutOfMemoryException:
    the machine's limit, never a file's or a document's fault."""
    limit = f"memory_limit {memory_limit or 'DuckDB default'}" + (f", {detail}" if detail else "")
    return duckdb.OutOfMemoryException(
        f"planning ran out of memory {where} ({limit}): raise the config's memory_limit, or give the staging "
        f"folder room to spill ({str(exc).strip().splitlines()[0]})")


def _last_load(con) -> int | None:
    """The newest `load_id` of the database (0: none yet), or None when its tables have no load ids (a
    database this code has not migrated yet: its loads then search all of a head's rows)."""
    have = {t for (t,) in con.execute("SELECT table_name FROM duckdb_columns() WHERE database_name = 'results' "
                                      "AND column_name = 'load_id' AND table_name IN ('doc_state', 'loaded_shards')"
                                      ).fetchall()}
    if have != {"doc_state", "loaded_shards"}:
        return None
    return con.execute("SELECT coalesce(max(load_id), 0) FROM results.loaded_shards").fetchone()[0]


def _live_aliases(con, head: PlanHead) -> tuple[str, ...]:
    """The head's earlier ids whose rows still count as its own: recorded in `models` for this head and
    not yet mapped to a current id (storage.db.map_legacy_model records the mapping)."""
    if not head.aliases:
        return ()
    rows = con.execute("SELECT model_id FROM results.models WHERE head = ? AND list_contains(?, model_id)",
                       [head.name, list(head.aliases)]).fetchall()
    try:
        mapped = {r[0] for r in con.execute("SELECT substr(key, 14) FROM results.taskheads_meta "
                                            "WHERE starts_with(key, 'legacy_model:')").fetchall()}
    except duckdb.CatalogException:  # a database from before versioning: nothing mapped yet
        mapped = set()
    return tuple(r[0] for r in rows if r[0] not in mapped)


def plan_counts(database: str | None, files: Sequence[str], heads: Sequence[PlanHead], id_column: str,
                text_column: str, unit_docs: int, full: bool = False, max_attempts: int = 3,
                retry_failed: bool = False, memory_limit: str | None = None, temp_directory: str | None = None
                ) -> tuple[dict[str, HeadPlan], int, list[str]]:
    """The counts of `open_plan` (no unit read, no input staged, nothing written): (plans, rows scanned,
    file error lines)."""
    with open_plan(database, files, heads, id_column, text_column, unit_docs, full, None, max_attempts,
                   retry_failed, memory_limit=memory_limit, temp_directory=temp_directory, with_units=False) as plan:
        return plan.heads, plan.rows_scanned, plan.errors


def preview_levels(database: str | None, files: Sequence[str], levels: Sequence[Sequence[PlanHead]], id_column: str,
                   text_column: str, unit_docs: int, full: bool = False, max_attempts: int = 3,
                   retry_failed: bool = False, tolerant: bool = False, memory_limit: str | None = None,
                   temp_directory: str | None = None) -> list[tuple[dict[str, HeadPlan], int, list[str]] | None]:
    """`plan_counts` of each level against the database as it is (read-only): None for a level below
    the first whose upstream results cannot be read yet (it is planned once its upstream loads), and
    with `tolerant` for any level that cannot be planned now (e.g. a database the run will migrate)."""
    out: list = []
    for depth, heads in enumerate(levels):
        try:
            out.append(plan_counts(database, files, heads, id_column, text_column, unit_docs, full, max_attempts,
                                   retry_failed, memory_limit, temp_directory))
        except NOT_THE_FILES_FAULT:
            raise
        except (RuntimeError, duckdb.Error):
            if depth == 0 and not tolerant:
                raise
            out.append(None)
    return out


def preview_open(database: str | None, files: Sequence[str], levels: Sequence[Sequence[PlanHead]], id_column: str,
                 text_column: str, unit_docs: int, full: bool = False, max_attempts: int = 3,
                 retry_failed: bool = False, memory_limit: str | None = None, temp_directory: str | None = None
                 ) -> list[tuple[dict[str, HeadPlan], int, list[str], LevelPlan | None] | None]:
    """`preview_levels` (tolerant), with the first level's plan left open (the caller closes it): when
    nothing changes the database before that level runs, it is the level's plan, so the corpus is
    not planned twice. Per level (plans, rows scanned, error lines, open plan or None) or None."""
    try:
        first = open_plan(database, files, levels[0], id_column, text_column, unit_docs, full, None, max_attempts,
                          retry_failed, memory_limit=memory_limit, temp_directory=temp_directory)
        out: list = [(first.heads, first.rows_scanned, first.errors, first)]
    except NOT_THE_FILES_FAULT:
        raise
    except (RuntimeError, duckdb.Error):
        out = [None]
    later = preview_levels(database, files, levels[1:], id_column, text_column, unit_docs, full, max_attempts,
                           retry_failed, tolerant=True, memory_limit=memory_limit,
                           temp_directory=temp_directory) if len(levels) > 1 else []
    return out + [None if known is None else (*known, None) for known in later]


def plan_work(database: str | None, files: Sequence[str], heads: Sequence[PlanHead], id_column: str,
              text_column: str, unit_docs: int, full: bool = False, inputs_dir: str | None = None,
              max_attempts: int = 3, retry_failed: bool = False) -> tuple[dict[str, HeadPlan], int, list[str]]:
    """`open_plan` with every unit read into `HeadPlan.units`: (plans, rows scanned, file error lines)."""
    with open_plan(database, files, heads, id_column, text_column, unit_docs, full, inputs_dir, max_attempts,
                   retry_failed) as plan:
        for h in heads:
            plan.heads[h.name].units = list(plan.units(h.name))
        return plan.heads, plan.rows_scanned, plan.errors


def _stage_inputs(con, i: int, head: PlanHead, files: Sequence[str], source: str, id_column: str,
                  text_column: str, inputs_dir: Path) -> dict[int, str]:
    """Write the rows to infer, with the upstream translation as text, to one Parquet file per corpus file
    (in row order, streamed in record batches); units then point at it (rows = positions, `pos`)."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    staged = {}
    for (file_no,) in con.execute(f"SELECT DISTINCT file_no FROM work_{i} WHERE NOT conflict ORDER BY 1").fetchall():
        path = files[file_no]
        present = set(pq.read_schema(path).names)
        extras = [c for c in head.extra_columns if c in present and c not in (id_column, text_column)]
        cols = ", ".join([f"{id_text('src.' + quote(id_column))} AS {quote(id_column)}",
                          f"{quote(head.input)}.text AS {quote(text_column)}"] + [f"src.{quote(c)}" for c in extras])
        out = inputs_dir / f"{head.name}-{hashlib.sha1(path.encode()).hexdigest()[:12]}.parquet"
        reader = con.sql(
            f"SELECT {cols} FROM {source} JOIN (SELECT row, pos FROM work_{i} WHERE file_no = ? AND NOT conflict) w "
            "ON src.file_row_number = w.row ORDER BY w.pos", params=[literal_path(path), file_no]).to_arrow_reader(65536)
        with pq.ParquetWriter(out, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
        staged[file_no] = str(out)
    return staged


def _plan_head(con, i: int, fp: int, head: PlanHead, has_state: bool, unit_docs: int, full: bool,
               retry: RetryRule = RetryRule(), load_ids: bool = False, passes: int = 1) -> HeadPlan:
    """Classify the head's routed rows (routing `r_<i>`, fingerprint `fp_<fp>` of the scan) into table
    `classified`, then number the ones to infer into units (table `work_<i>`, ordered by unit); returns
    the counts.

    Narrow on purpose, for corpora of millions: fingerprints are two integers, only ids that occur more
    than once are sorted (to find their first occurrence), and only the head's current models' states
    are joined. In `passes` > 1 statements, each over the ids of one hash partition (every row of an id,
    its state and its failures fall in the same one, so each pass is exact on its own): DuckDB's joins over
    millions of rows need memory that grows with them, and a pass's stays within `memory_limit`."""
    if has_state:
        # any model's state: a document's earlier rows are replaced whichever model wrote them; only the
        # current models' states make it unchanged
        state_join = (f"LEFT JOIN (SELECT doc_id, {fingerprint_halves('fingerprint', 'fp')}, "
                      "  list_contains($models, model_id) AS current, "
                      f"  {'load_id' if load_ids else 'NULL::BIGINT'} AS load_id FROM results.doc_state "
                      "  WHERE head = $head AND status = 'done' AND {in_pass}) d "
                      "ON d.doc_id = s.doc_id "
                      # the document's last failed attempt (plan-stage rows are about other occurrences)
                      f"LEFT JOIN (SELECT doc_id, {fingerprint_halves('fingerprint', 'fp')}, model_id, kind, "
                      "  coalesce(attempts, 1) AS attempts "
                      "  FROM results.failed_docs WHERE head = $head AND stage <> 'plan' AND doc_id IS NOT NULL AND {in_pass} "
                      "  QUALIFY row_number() OVER (PARTITION BY doc_id ORDER BY attempts DESC) = 1) f "
                      "ON f.doc_id = s.doc_id")
    else:
        state_join = ("LEFT JOIN (SELECT NULL::VARCHAR AS doc_id, NULL::UBIGINT AS fp_hi, NULL::UBIGINT AS fp_lo, "
                      "NULL::BOOLEAN AS current, NULL::BIGINT AS load_id) d "
                      "ON false LEFT JOIN (SELECT NULL::VARCHAR AS doc_id, NULL::UBIGINT AS fp_hi, NULL::UBIGINT AS fp_lo, "
                      "NULL::VARCHAR AS model_id, NULL::VARCHAR AS kind, NULL::INTEGER AS attempts) f ON false")
    models = [head.model_id, *head.aliases]
    for k in range(passes):
        con.execute(("CREATE OR REPLACE TEMP TABLE classified AS " if k == 0 else "INSERT INTO classified ")
                    + _classified_sql(i, fp, state_join.format(in_pass=_in_pass("doc_id", passes, k)), passes, k),
                    {"models": models, "max_attempts": retry.max_attempts, "retry_all": retry.retry_all, "full": full}
                    | ({"head": head.name} if has_state else {}))
    counts = dict(con.execute("SELECT kind || CASE WHEN kind <> 'first' THEN '' WHEN unchanged THEN '-unchanged' "
                              "WHEN held THEN '-held' WHEN retry THEN '-retry' ELSE '' END, "
                              "count(*) FROM classified GROUP BY ALL").fetchall())
    if not full:  # the unchanged first occurrences left out of `classified`
        (routed,) = con.execute(f"SELECT count(*) FROM scan WHERE r_{i}").fetchone()
        counts["first-unchanged"] = routed - sum(counts.values())
    # the rows that need work, numbered into units in SQL (per file, in row order, `unit_docs` rows each,
    # duplicates refused in place): only the units being submitted are ever read back into Python
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE work_{i} AS
        WITH todo AS (
            SELECT file_no, row, doc_id, fp_hi, fp_lo, kind = 'conflict' AS conflict, first_file, first_row,
                   had_state, prev_load
            FROM classified WHERE kind = 'conflict' OR (kind = 'first' AND (NOT unchanged OR $full) AND NOT held)
        ), numbered AS (
            SELECT *, (row_number() OVER (PARTITION BY file_no ORDER BY row) - 1) // $unit_docs AS unit_in_file,
                   row_number() OVER (PARTITION BY file_no, conflict ORDER BY row) - 1 AS pos,
                   bool_or(NOT conflict) OVER (PARTITION BY file_no) AS file_staged
            FROM todo
        )
        SELECT (dense_rank() OVER (ORDER BY file_no, unit_in_file) - 1)::BIGINT AS unit_no, file_no, row, doc_id,
               fp_hi, fp_lo, conflict, first_file, first_row, pos, file_staged, had_state, prev_load
        FROM numbered ORDER BY unit_no, row""", {"full": full, "unit_docs": unit_docs})
    con.execute("DROP TABLE classified")
    to_infer, conflicts, n_units = con.execute(
        f"SELECT count(*) FILTER (WHERE NOT conflict), count(*) FILTER (WHERE conflict), coalesce(max(unit_no) + 1, 0) "
        f"FROM work_{i}").fetchone()
    return HeadPlan(routed=sum(counts.values()), duplicates=counts.get("repeat", 0),
                    unchanged=0 if full else counts.get("first-unchanged", 0),
                    retried=counts.get("first-retry", 0), skipped_failed=counts.get("first-held", 0),
                    to_infer=to_infer, conflicts=conflicts, n_units=n_units)


def _in_pass(doc_id: str, passes: int, k: int) -> str:
    """SQL: the id `doc_id` belongs to pass `k` of `passes` (each id, NULL too, to exactly one)."""
    return "true" if passes == 1 else f"coalesce(hash({doc_id}) % {passes}, 0) = {k}"


def _passes(con, rows: int) -> int:
    """Passes that classify `rows` scanned rows within the connection's memory_limit. DuckDB's joins over
    millions of rows need memory that grows with them: a 10M-row rerun of one head ran out at 64MB and planned
    at 80MB in one statement; in 2, 4 and 8 passes it planned at 64MB, 48MB and 32MB (benchmarks/README).
    About 100k rows a pass per MiB above 22 MiB, below all of those."""
    (limit,) = con.execute("SELECT value FROM duckdb_settings() WHERE name = 'memory_limit'").fetchone()
    per_pass = max(100_000, int((memory_bytes(limit) / 2**20 - 22) * 100_000))
    return max(1, -(-rows // per_pass))


def _classified_sql(i: int, fp: int, state_join: str, passes: int, k: int) -> str:
    """The query classifying head `i`'s routed rows of pass `k` of `passes`: each row's occurrence of its id,
    whether it is unchanged against the state, and its earlier failure."""
    in_pass = _in_pass("doc_id", passes, k)
    return f"""
        WITH repeated AS (  -- ids seen more than once: only their rows are ordered to find the first
            SELECT doc_id FROM scan WHERE r_{i} AND doc_id IS NOT NULL AND {in_pass} GROUP BY doc_id HAVING count(*) > 1
        ), occurrences AS (
            SELECT file_no, row,
                   row_number() OVER w AS occurrence,
                   first_value(fp_{fp}_hi) OVER w AS first_fp_hi,
                   first_value(fp_{fp}_lo) OVER w AS first_fp_lo,
                   first_value(file_no) OVER w AS first_file,
                   first_value(row) OVER w AS first_row
            FROM scan SEMI JOIN repeated USING (doc_id) WHERE r_{i}
            WINDOW w AS (PARTITION BY doc_id ORDER BY file_no, row)
        ), routed AS (
            SELECT s.file_no, s.row, s.doc_id, s.fp_{fp}_hi AS fp_hi, s.fp_{fp}_lo AS fp_lo,
                   coalesce(o.occurrence, 1) AS occurrence, o.first_fp_hi, o.first_fp_lo,
                   coalesce(o.first_file, s.file_no) AS first_file, coalesce(o.first_row, s.row) AS first_row
            FROM scan s LEFT JOIN occurrences o ON o.file_no = s.file_no AND o.row = s.row
            WHERE s.r_{i} AND {_in_pass("s.doc_id", passes, k)}
        ), judged AS (
            SELECT s.file_no, s.row, s.doc_id, s.fp_hi, s.fp_lo,
                   CASE WHEN s.occurrence = 1 THEN 'first'
                        WHEN {_same('s.fp', 's.first_fp')} THEN 'repeat'
                        ELSE 'conflict' END AS kind,
                   s.first_file, s.first_row,
                   coalesce(d.current AND s.fp_hi IS NOT NULL AND d.fp_hi = s.fp_hi AND d.fp_lo = s.fp_lo, false)
                     AS unchanged,
                   d.doc_id IS NOT NULL AS had_state, d.load_id AS prev_load,
                   coalesce({_same('f.fp', 's.fp')} AND list_contains($models, f.model_id), false)
                     AS failed_before,
                   coalesce(f.kind = 'terminal' OR f.attempts >= $max_attempts, false) AS retries_spent
            FROM routed s {state_join}
        )
        SELECT * EXCLUDE (failed_before, retries_spent),
               failed_before AND NOT unchanged AS retry,
               failed_before AND NOT unchanged AND retries_spent AND NOT $retry_all AS held
        FROM judged
        WHERE $full OR NOT (kind = 'first' AND unchanged)  -- a rerun keeps only what changed: counted below
"""
