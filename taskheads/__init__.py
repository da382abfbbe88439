"""taskheads: transformer task heads over Parquet corpora, results in DuckDB.

Importing the package is cheap; functions load what they need when called.
"""
from __future__ import annotations


def search(database, query: str, head: str, k: int = 10, where: str | None = None, approximate: bool = False):
    """Documents most similar to `query` under an embedding head: an Arrow table (doc_id, score, text).

    See `taskheads.vectors.search`; `near_duplicates` is there too.
    """
    from .vectors import search as _search

    return _search(database, query, head, k=k, where=where, approximate=approximate)
