"""taskheads: transformer task heads over Parquet corpora, results in DuckDB.

    import taskheads
    summary = taskheads.run("pipeline.toml")          # or a dict, or a taskheads.Pipeline
    topics = taskheads.results("results.duckdb", "topic")   # pyarrow.Table of the head's current rows
    with taskheads.connect("results.duckdb") as con:  # read-only; closed when the block ends
        con.sql("SELECT label, count(*) FROM latest_classifications GROUP BY label").show()

Importing the package is cheap (no Prefect, torch or DuckDB): functions load what they need when
called, and `Pipeline`, `Head`, `RunSummary`, `HeadSummary` are loaded on first access.
"""
from __future__ import annotations

import core  # noqa: F401  (first: it picks Arrow's allocator before pyarrow loads)

from .api import connect, load_config, results, run


def _version() -> str:
    """The installed distribution's version (read on first access: importlib.metadata costs ~0.1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskheads")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"

# name -> (module, attribute): loaded on first access (they import pydantic, Prefect)
_LAZY = {"Pipeline": ("pipeline.config", "PipelineConfig"), "Head": ("pipeline.config", "HeadConfig"),
         "RunSummary": ("flows.process_corpus", "RunSummary"), "HeadSummary": ("flows.process_corpus", "HeadSummary"),
         "ConfigError": ("core.errors", "ConfigError")}

__all__ = ["run", "load_config", "connect", "results", "search", "Pipeline", "Head", "RunSummary", "HeadSummary",
           "ConfigError", "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'taskheads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})


def search(database, query: str, head: str, k: int = 10, where: str | None = None, approximate: bool = False):
    """Documents most similar to `query` under an embedding head: an Arrow table (doc_id, score, text).

    See `taskheads.vectors.search`; `near_duplicates` is there too.
    """
    from .vectors import search as _search

    return _search(database, query, head, k=k, where=where, approximate=approximate)
