"""Checks that need the corpus but no model: run before any work so bad configs fail fast."""
from __future__ import annotations

from storage.corpus import CorpusError, corpus_files, readable_schema, validate_where

from .config import ConfigError, PipelineConfig


def preflight(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError for problems that stop the run; return the corpus files."""
    try:
        files = corpus_files(cfg.corpus)
    except CorpusError as exc:
        raise ConfigError(f"corpus: {exc}") from None
    schema = readable_schema(files)  # unreadable files are reported per file by the run
    for head in cfg.heads:
        if head.where and schema is not None:
            problem = validate_where(schema, head.where)
            if problem:
                raise ConfigError(f"heads.{head.name}.where: invalid predicate {head.where!r}: {problem}")
    return files
