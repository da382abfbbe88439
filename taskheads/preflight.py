"""Checks that need the corpus but no model: run before any work so bad configs fail fast."""
from __future__ import annotations

from storage.corpus import CorpusError, corpus_files, check_files, readable_schema, validate_where

from .config import ConfigError, PipelineConfig


def preflight(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError for problems that stop the run; return the corpus files."""
    try:
        files = corpus_files(cfg.corpus)
    except CorpusError as exc:
        raise ConfigError(f"corpus: {exc}") from None
    _, file_errors = check_files(files, [cfg.id_column, cfg.text_column])
    if file_errors and len(file_errors) == len(files):  # nothing could run: stop before any work
        more = f" (and {len(file_errors) - 1} more file(s) with problems)" if len(file_errors) > 1 else ""
        raise ConfigError(f"corpus: {file_errors[0]}{more}")
    schema = readable_schema(files)  # unreadable files are reported per file by the run
    for head in cfg.heads:
        if head.where and schema is not None:
            problem = validate_where(schema, head.where)
            if problem:
                raise ConfigError(f"heads.{head.name}.where: invalid predicate {head.where!r}: {problem}")
    return files
