"""Checks that need the corpus but no model: run before any work so bad configs fail fast."""
from __future__ import annotations

from core.errors import ConfigError
from heads.registry import head_class
from storage.corpus import CorpusError, check_files, corpus_files, readable_schema, validate_where
from storage.evaluate import GOLD_TASKS

from .config import PipelineConfig


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
        if head.gold_column and schema is not None and head.gold_column not in schema.names:
            raise ConfigError(f"heads.{head.name}.gold_column: no column {head.gold_column!r} in the corpus "
                              f"(columns: {', '.join(schema.names)})")
        if head.gold_column and head.task not in GOLD_TASKS:
            raise ConfigError(f"heads.{head.name}.gold_column: evaluation is available for "
                              f"{', '.join(sorted(GOLD_TASKS))} heads, not {head.task}")
        routing = cfg.routing(head)
        if routing and schema is not None:
            upstream = {u: cfg.head(u).result_table for u in cfg.upstream(head)}
            clash = sorted(set(upstream) & set(schema.names))
            if clash:
                raise ConfigError(f"heads.{head.name}: it reads head {clash[0]!r}, which is also the name of a "
                                  "corpus column (ambiguous in its routing): rename that head")
            problem = validate_where(schema, routing, cfg.id_column, upstream)
            if problem:
                key = "where" if head.where else ("source_lang" if head.source_lang else "input")
                raise ConfigError(f"heads.{head.name}.{key}: invalid predicate {routing!r}: {problem}")
    return files


def unpinned_models(cfg: PipelineConfig) -> list[str]:
    """One line per head whose model is a hub id without `revision`: the hub may serve other weights
    tomorrow (a new commit on the default branch), and the run would not say so."""
    return [f"heads.{h.name}.model: hub model {h.model!r} is not pinned; add revision = \"<commit sha>\" "
            "so every run loads the same weights"
            for h in cfg.heads
            if head_class(h.task).model_class is not None and h.revision is None and not h.is_local]
