"""Labelled rows for training and evaluation, as Parquet files (storage/ is the only Parquet code).

Rows are plain dicts: nested values (NER entity lists) round-trip as Arrow lists of structs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def read_rows(path: str) -> list[dict]:
    """All rows of one Parquet file (or a folder of them) as dicts."""
    if not Path(path).exists():
        raise FileNotFoundError(f"training data not found: {path}")
    return pq.read_table(path).to_pylist()


def write_rows(path: str, rows: Sequence[dict]) -> str:
    """Write rows to one Parquet file; the schema is inferred from the rows."""
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path
