"""Reading document corpora from Parquet: listing and checking files, reading rows as documents.

A corpus is a file, a folder (all *.parquet below it) or a glob. A saved Hugging Face dataset folder
(`save_to_disk`), given or found inside a corpus folder, is read through its cached Parquet export
(storage.saved_dataset): each Dataset, or each split of a DatasetDict, is one file of the corpus. Files are read by the row groups
holding a work unit's rows, never whole, so memory does not grow with corpus size. A file that
cannot be used is reported with its name and the problem, and the other files still run.
"""
from __future__ import annotations

import bisect
import glob as globlib
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.doc import Doc
from core.tables import ResultTable

from .saved_dataset import DatasetLoadError, dataset_sources, export, is_saved_dataset, short_name


class CorpusError(Exception):
    """The corpus as a whole cannot be read (e.g. the glob matches nothing)."""


def corpus_files(spec: str) -> list[str]:
    """The corpus's Parquet files in order; a saved dataset (split) stands at its folder's place as
    its cached export, or as the folder itself when it cannot be loaded (check_files says why)."""
    p = Path(spec)
    # broken links and unreadable files are kept: check_files names them instead of skipping silently
    files: list[str] = []
    datasets: list[str] = []  # saved Dataset folders (a DatasetDict's splits), even when missing
    if p.is_file():
        files = [str(p)]
    elif p.is_dir():
        files = [str(f) for f in p.rglob("*.parquet") if f.is_file() or f.is_symlink()]
        datasets = [str(d) for d in dataset_sources(p)]
    else:
        for f in globlib.glob(spec, recursive=True):
            if os.path.isfile(f) or os.path.islink(f):
                files.append(f)
            elif os.path.isdir(f) and is_saved_dataset(Path(f)):
                datasets += [str(d) for d in dataset_sources(Path(f))]
    folders = set(datasets)
    out = [_exported(s) if s in folders else s for s in sorted(set(files) | folders)]
    if not out:
        raise CorpusError(f"corpus {spec!r}: no Parquet files found (nor saved datasets)")
    return out


def _exported(folder: str) -> str:
    try:
        return export(folder)
    except DatasetLoadError:
        return folder


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def check_files(files: Sequence[str], required: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split files into usable ones and one error line per file that cannot be used."""
    good: list[str] = []
    errors: list[str] = []
    for path in files:
        if os.path.isdir(path) or os.path.isfile(os.path.join(os.path.dirname(path), "dataset_dict.json")):
            # a saved dataset (split) whose export failed: load it again for the reason
            try:
                path = export(path)
            except DatasetLoadError as exc:
                errors.append(f"{path}: not a loadable saved Hugging Face dataset ({exc})")
                continue
        try:
            pq.ParquetFile(path).metadata  # footer readable
            names = set(pq.read_schema(path).names)
        except Exception as exc:
            errors.append(f"{path}: not a readable Parquet file ({_describe(exc)})")
            continue
        missing = [c for c in required if c not in names]
        if missing:
            errors.append(f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                          f"(columns: {', '.join(sorted(names))})")
            continue
        good.append(path)
    return good, errors


# rows decoded at a time when a unit reads its rows out of a larger row group
READ_BATCH_ROWS = 4096

# One unit of a process reads the corpus at a time. A page is decoded whole, and writers such as DuckDB's
# `COPY ... TO 'x.parquet'` put a row group's column in one page (~20MB of text for 122,880 news-like rows):
# each unit reading at once held its own. The read is short beside a unit's inference.
_ONE_READ_AT_A_TIME = threading.Lock()


def read_rows(path: str, rows: Sequence[int], columns: Sequence[str]) -> pa.Table:
    """The given rows of a Parquet file (in the order given), reading only the row groups holding them.

    A group is decoded a batch at a time, keeping only the wanted rows and stopping after the last: a unit
    of a few thousand rows in a group of ~123k holds about a batch in memory, not the decoded group (one
    page, where the writer made the group's column one page), one unit of the process at a time."""
    with _ONE_READ_AT_A_TIME:
        return _read_rows(path, rows, columns)


def _read_rows(path: str, rows: Sequence[int], columns: Sequence[str]) -> pa.Table:
    pf = pq.ParquetFile(path)
    meta = pf.metadata
    wanted = sorted(set(rows))
    kept, start = [], 0  # kept: the wanted rows, in file order
    for g in range(meta.num_row_groups):
        end = start + meta.row_group(g).num_rows
        if here := _in_range(wanted, start, end):
            at = start
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[g], columns=list(columns),
                                         use_threads=False):
                if local := _in_range(here, at, at + batch.num_rows):
                    kept.append(batch.take(pa.array([r - at for r in local], pa.int64())))
                at += batch.num_rows
                if at > here[-1]:
                    break
        start = end
    empty = pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table
    table = pa.Table.from_batches(kept) if kept else empty()
    position = {r: i for i, r in enumerate(wanted)}
    return table.take(pa.array([position[r] for r in rows], pa.int64()))


def _in_range(sorted_rows: list[int], a: int, b: int) -> list[int]:
    return sorted_rows[bisect.bisect_left(sorted_rows, a):bisect.bisect_left(sorted_rows, b)]


def readable_schema(files: Sequence[str]) -> pa.Schema | None:
    """The schema of the first file that can be read (None if none can)."""
    for path in files:
        try:
            return pq.read_schema(path)
        except Exception:
            continue
    return None


def id_text(expr: str) -> str:
    """SQL turning a document id (any type) into its text: DuckDB's CAST to VARCHAR, in UTC (the
    connection's TimeZone, set by the sandbox). The one reference for planning, loading, routing joins
    and gold evaluation; `doc_ids` applies it to ids read in Python."""
    return f"CAST({expr} AS VARCHAR)"


def doc_ids(values: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Ids as text, exactly as the planner's id_text makes them (None stays None)."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.to_pylist()
    if pa.types.is_integer(values.type):  # the same digits as DuckDB's CAST, without an instance per unit
        return pc.cast(values, pa.string()).to_pylist()
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        ids = pa.table({"id": values, "pos": pa.array(range(len(values)), pa.int64())})
        con.register("ids", ids)
        return [r[0] for r in con.execute(f"SELECT {id_text('id')} FROM ids ORDER BY pos").fetchall()]
    finally:
        con.close()


def validate_where(schema: pa.Schema, where: str, id_column: str = "id",
                   upstream: Mapping[str, ResultTable] | None = None) -> str | None:
    """Check a predicate against corpus columns and the upstream heads it reads ({head: its result table},
    seen as struct columns named after the heads, as planning sees them, over empty tables);
    returns the problem (not one expression, or DuckDB's error line) or None. Runs sandboxed, on
    empty tables: no file is opened."""
    from .plan import create_upstream, source_sql
    from .sandbox import check_expression, lock_down
    from .schema import ddl

    try:
        predicate = check_expression(where)
    except ValueError as exc:
        return str(exc)
    con = duckdb.connect()
    try:
        con.register("corpus", schema.empty_table())
        if upstream:
            con.execute("ATTACH ':memory:' AS results")
            con.execute("USE results")
            for sql in ddl(upstream.values()):
                con.execute(sql)
            con.execute("USE memory")
            create_upstream(con, upstream)
        lock_down(con)
        con.execute(f"SELECT count(*) FROM {source_sql('corpus', list(upstream or ()), id_column)} "
                    f"WHERE {predicate}").fetchall()
        return None
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        con.close()


def read_docs(path: str, rows: Sequence[int], id_column: str, text_column: str,
              extra_columns: Sequence[str]) -> tuple[list[tuple[int, Doc]], list[dict]]:
    """Read rows as Docs; rows that cannot be documents come back as {row, doc_id, error}."""
    names = pq.read_schema(path).names
    wanted = [id_column, text_column] + [c for c in extra_columns if c not in (id_column, text_column) and c in names]
    table = read_rows(path, rows, wanted)
    ids = doc_ids(table.column(id_column))
    texts = table.column(text_column).to_pylist()
    extras = {c: table.column(c).to_pylist() for c in wanted[2:]}
    docs: list[tuple[int, Doc]] = []
    invalid: list[dict] = []
    for k, row in enumerate(rows):
        doc_id, text = ids[k], texts[k]
        problem = None
        if doc_id is None:
            problem = f"null id (row {row} of {short_name(path)})"
        elif text is None:
            problem = "null text"
        elif not isinstance(text, str):
            problem = f"text is not a string ({type(text).__name__})"
        elif not text.strip():
            problem = "empty text" if text == "" else "whitespace-only text"
        if problem:
            invalid.append({"row": row, "doc_id": doc_id, "error": problem})
        else:
            docs.append((row, Doc(doc_id, text, {c: v[k] for c, v in extras.items()})))
    return docs, invalid
