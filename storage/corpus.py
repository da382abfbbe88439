"""Reading document corpora from Parquet: listing files, planning work units, routing rows.

A corpus is a file, a folder (all *.parquet below it) or a glob. Files are read by row ranges (work
units), never whole, so memory does not grow with corpus size. A file that cannot be used is
reported with its name and the problem, and the other files still run. Routing predicates
(`where`) are evaluated by DuckDB over the unit's Arrow table: the only SQL that comes from
outside is the config's predicate; document text is never formatted into SQL.
"""
from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from heads.base import Doc


class CorpusError(Exception):
    """The corpus as a whole cannot be read (e.g. the glob matches nothing)."""


@dataclass(frozen=True)
class Unit:
    """A slice of one Parquet file: rows [start, stop)."""

    path: str
    start: int
    stop: int

    @property
    def unit_id(self) -> str:
        return f"{Path(self.path).name}:{self.start}-{self.stop}"


@dataclass
class UnitDocs:
    docs: list[Doc]
    routes: dict[str, list[int]]  # head name -> indices into docs
    invalid: list[dict] = field(default_factory=list)  # {doc_id, error, heads}
    rows_read: int = 0


def corpus_files(spec: str) -> list[str]:
    p = Path(spec)
    if p.is_file():
        files = [str(p)]
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet") if f.is_file())
    else:
        files = sorted(f for f in globlib.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise CorpusError(f"corpus {spec!r}: no Parquet files found")
    return files


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def plan_units(files: Sequence[str], unit_docs: int, required: Sequence[str]) -> tuple[list[Unit], list[str]]:
    """Split files into units of at most `unit_docs` rows; returns (units, one error line per bad file)."""
    units: list[Unit] = []
    errors: list[str] = []
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
            names = set(pq.read_schema(path).names)
        except Exception as exc:
            errors.append(f"{path}: not a readable Parquet file ({_describe(exc)})")
            continue
        missing = [c for c in required if c not in names]
        if missing:
            errors.append(f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                          f"(columns: {', '.join(sorted(names))})")
            continue
        for start in range(0, meta.num_rows, unit_docs):
            units.append(Unit(path, start, min(start + unit_docs, meta.num_rows)))
    return units, errors


def _read_rows(unit: Unit, columns: Sequence[str]) -> pa.Table:
    pf = pq.ParquetFile(unit.path)
    meta = pf.metadata
    groups, offset, first_offset = [], 0, None
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if offset + n > unit.start and offset < unit.stop:
            groups.append(g)
            if first_offset is None:
                first_offset = offset
        offset += n
    table = pf.read_row_groups(groups, columns=list(columns))
    return table.slice(unit.start - (first_offset or 0), unit.stop - unit.start)


def route_rows(table: pa.Table, routes: Mapping[str, str | None]) -> dict[str, list[int]]:
    """Row indices of `table` each head's `where` predicate selects (all rows when None)."""
    out = {name: list(range(table.num_rows)) for name, where in routes.items() if not where}
    preds = {name: where for name, where in routes.items() if where}
    if preds:
        con = duckdb.connect()
        corpus = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
        con.register("corpus", corpus)
        for name, where in preds.items():
            rows = con.execute(f"SELECT __row FROM corpus WHERE ({where}) ORDER BY __row").fetchall()
            out[name] = [r[0] for r in rows]
        con.close()
    return out


def readable_schema(files: Sequence[str]) -> pa.Schema | None:
    """The schema of the first file that can be read (None if none can)."""
    for path in files:
        try:
            return pq.read_schema(path)
        except Exception:
            continue
    return None


def validate_where(schema: pa.Schema, where: str) -> str | None:
    """Check a predicate against corpus columns; returns the DuckDB error line or None."""
    con = duckdb.connect()
    try:
        con.register("corpus", schema.empty_table())
        con.execute(f"SELECT count(*) FROM corpus WHERE ({where})").fetchall()
        return None
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        con.close()


def read_unit(unit: Unit, id_column: str, text_column: str, extra_columns: Sequence[str],
              routes: Mapping[str, str | None]) -> UnitDocs:
    """Read one unit: valid rows become Docs routed to heads; invalid rows are reported, not dropped."""
    schema_names = pq.read_schema(unit.path).names
    wanted = [id_column, text_column] + [c for c in extra_columns if c not in (id_column, text_column)]
    # where predicates may use any column: read them all (the unit is small)
    table = _read_rows(unit, schema_names)
    routed = route_rows(table, routes)
    ids = table.column(id_column).to_pylist()
    texts = table.column(text_column).to_pylist()
    extras = {c: table.column(c).to_pylist() for c in wanted[2:] if c in schema_names}
    docs: list[Doc] = []
    row_to_doc: dict[int, int] = {}
    invalid: list[dict] = []
    file_name = Path(unit.path).name
    for r in range(table.num_rows):
        raw_id, text = ids[r], texts[r]
        doc_id = None if raw_id is None else str(raw_id)
        problem = None
        if raw_id is None:
            problem = f"null id (row {unit.start + r} of {file_name})"
        elif text is None:
            problem = "null text"
        elif not isinstance(text, str):
            problem = f"text is not a string ({type(text).__name__})"
        elif not text.strip():
            problem = "empty text" if text == "" else "whitespace-only text"
        if problem:
            invalid.append({"doc_id": doc_id, "error": problem, "row": r})
            continue
        row_to_doc[r] = len(docs)
        docs.append(Doc(doc_id, text, {c: v[r] for c, v in extras.items()}))
    routes_out: dict[str, list[int]] = {}
    for name, rows in routed.items():
        routes_out[name] = [row_to_doc[r] for r in rows if r in row_to_doc]
    for item in invalid:
        item["heads"] = [name for name, rows in routed.items() if item["row"] in set(rows)]
    return UnitDocs(docs, routes_out, invalid, table.num_rows)
