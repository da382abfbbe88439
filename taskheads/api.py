"""The Python API behind `taskheads.run`, `load_config`, `connect` and `results` (see taskheads/__init__.py).

A config given as a dict or a typed `Pipeline` goes through the same parser as a TOML file (every
check, one-line errors naming the key), with relative paths resolved from the working directory.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Union

if TYPE_CHECKING:  # pragma: no cover
    import duckdb
    import pyarrow as pa

    from flows.process_corpus import RunSummary
    from pipeline.config import PipelineConfig

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], "PipelineConfig"]


def load_config(config: ConfigLike) -> "PipelineConfig":
    """A config, parsed and validated (ConfigError: one line naming the key).

    `config`: a TOML file (paths relative to its folder), a dict of the same keys (paths relative to
    the working directory), or a `Pipeline` (checked again as if written as a dict)."""
    from pipeline.config import PipelineConfig, load_config as load_file, parse_config

    if isinstance(config, (str, os.PathLike)):
        return load_file(config)
    if isinstance(config, PipelineConfig):
        return parse_config(as_dict(config), Path.cwd(), source=config.source)
    if isinstance(config, Mapping):
        return parse_config(_fspaths(config), Path.cwd())
    raise TypeError(f"config: expected a TOML file path, a dict or a taskheads.Pipeline, got {type(config).__name__}")


def _fspaths(raw: Mapping) -> dict:
    """Path objects as strings (a notebook's `Path("data")`), in the top level and each head's table."""
    def plain(v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    out = {k: plain(v) for k, v in raw.items()}
    if isinstance(out.get("heads"), Mapping):
        out["heads"] = {n: {k: plain(v) for k, v in h.items()} if isinstance(h, Mapping) else h
                        for n, h in out["heads"].items()}
    return out


def as_dict(cfg: "PipelineConfig") -> dict:
    """The config as the keys of a TOML file (paths as they are in `cfg`; unset keys left out)."""
    from core.config import HeadKeys, PipelineKeys

    top = {k: getattr(cfg, k) for k in PipelineKeys.model_fields if getattr(cfg, k) is not None}
    heads = {}
    for h in cfg.heads:
        keys = {k: getattr(h, k) for k in HeadKeys.model_fields if getattr(h, k) is not None}
        keys["depends_on"] = list(h.depends_on)
        heads[h.name] = {**keys, **dict(h.params)}
    return {**top, "heads": heads}


def _absolute(path: str | os.PathLike | None) -> str | None:
    if isinstance(path, str) and path.startswith("ducklake:"):  # a lake: its SQLite catalog path made absolute
        from storage.lake import resolve

        return resolve(path, Path.cwd())
    return os.path.abspath(os.fspath(path)) if path is not None else None


def run(config: ConfigLike, *, corpus: str | os.PathLike | None = None, database: str | os.PathLike | None = None,
        full: bool = False) -> "RunSummary":
    """Run the corpus flow on `config` (only new or changed documents unless `full`); its summary.

    The config is checked against the corpus before any work (ConfigError); a hub model without
    `revision` is a UserWarning. Called inside a Prefect flow, the corpus flow runs as its subflow.
    File errors do not raise: they are in `summary.file_errors` and `summary.status`."""
    from flows.process_corpus import HeadSummary, RunSummary, process_corpus
    from pipeline.preflight import preflight, unpinned_models
    from storage.db import check_database

    cfg = load_config(config).with_overrides(corpus=_absolute(corpus), database=_absolute(database))
    preflight(cfg)
    check_database(cfg.database)
    for line in unpinned_models(cfg):
        warnings.warn(line, UserWarning, stacklevel=2)
    if isinstance(config, (str, os.PathLike)):  # the flow reads the file, as from the CLI
        out = process_corpus(config_path=os.fspath(config), corpus=cfg.corpus, database=cfg.database, full=full)
    else:
        out = process_corpus(config_path=cfg.source, config=as_dict(cfg), full=full)
    heads = {name: HeadSummary(**h) for name, h in out["heads"].items()}
    return RunSummary(**{**out, "heads": heads})


@contextmanager
def connect(database: str | os.PathLike, wait_seconds: float = 30.0) -> Iterator["duckdb.DuckDBPyConnection"]:
    """A read-only DuckDB connection to a results database, closed when the block ends.

    Waits up to `wait_seconds` while a run holds the file for a load; a run waits for it in turn,
    so keep the block short: open, query, close. FileNotFoundError for a missing file."""
    from storage.reader import open_reader

    with open_reader(database, wait_seconds) as con:
        yield con


def results(database: str | os.PathLike, head: str) -> "pa.Table":
    """The head's current rows (the `latest_<table>` view of its result table) as an Arrow table.

    Empty for a head that ran and found nothing; LookupError naming the heads there are when `head`
    never ran."""
    from heads.registry import head_class
    from storage.reader import head_results

    return head_results(database, head, table_of=lambda task, params: head_class(task).table_for(params))
