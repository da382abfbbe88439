"""All DuckDB DDL in one place. Result tables share `head, doc_id, run_id, model_id`."""
from __future__ import annotations

import re

import pyarrow as pa

# A head's name is an SQL struct in routing predicates and part of staged package names.
HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def quote(name: str) -> str:
    """An SQL identifier (column or head name) quoted for DuckDB; never used for values."""
    return '"' + name.replace('"', '""') + '"'


# Arrow schemas of the rows each result table receives (what heads' decode returns, plus keys).
KEY_FIELDS = [pa.field("head", pa.string()), pa.field("doc_id", pa.string())]
LINEAGE_FIELDS = [pa.field("run_id", pa.string()), pa.field("model_id", pa.string())]

RESULT_FIELDS: dict[str, list[pa.Field]] = {
    "classifications": [
        pa.field("label", pa.string()), pa.field("score", pa.float64()),
        pa.field("scores", pa.map_(pa.string(), pa.float64())),
        pa.field("n_chunks", pa.int32()), pa.field("long_text", pa.string()),
    ],
    "entities": [
        pa.field("entity_group", pa.string()), pa.field("text", pa.string()),
        pa.field("start_char", pa.int64()), pa.field("end_char", pa.int64()), pa.field("score", pa.float64()),
    ],
    "answers": [
        pa.field("question", pa.string()), pa.field("answer", pa.string()),
        pa.field("start_char", pa.int64()), pa.field("end_char", pa.int64()), pa.field("score", pa.float64()),
        pa.field("n_windows", pa.int32()),
    ],
    "translations": [pa.field("translation", pa.string()), pa.field("n_segments", pa.int32())],
    "lm_scores": [
        pa.field("perplexity", pa.float64()), pa.field("mean_nll", pa.float64()),  # causal_lm
        pa.field("pseudo_perplexity", pa.float64()), pa.field("mean_log_prob", pa.float64()),  # masked_lm
        pa.field("n_tokens", pa.int64()), pa.field("n_windows", pa.int32()),
    ],
    "generations": [
        pa.field("prompt_id", pa.int32()), pa.field("text", pa.string()),
        pa.field("n_new_tokens", pa.int32()), pa.field("finish_reason", pa.string()),
    ],
    "fill_mask": [
        pa.field("mask_index", pa.int32()), pa.field("token", pa.string()), pa.field("token_id", pa.int64()),
        pa.field("score", pa.float64()), pa.field("rank", pa.int32()),
    ],
    "languages": [
        pa.field("language", pa.string()),  # ISO 639-1 code; NULL when no language can be told
        pa.field("confidence", pa.float64()), pa.field("n_chars", pa.int64()),
    ],
    "choices": [
        pa.field("choice", pa.string()), pa.field("score", pa.float64()), pa.field("logit", pa.float64()),
        pa.field("rank", pa.int32()), pa.field("truncated", pa.bool_()),
    ],
    # a list column (not FLOAT[dim]): heads of different sizes share the table, and it works on every
    # storage backend; `window` is -1 for a document's vector, 0..n-1 for per-window rows (a reserved
    # word in SQL: write "window" in queries)
    "embeddings": [
        pa.field("window", pa.int32()), pa.field("dim", pa.int32()),
        pa.field("embedding", pa.list_(pa.float32())), pa.field("n_tokens", pa.int64()),
    ],
}
# What a downstream head's `where` sees of an upstream head: one struct per document, named after the
# head (`topic.label`, `ner.n`, `english.text`), aggregated over the head's rows `r` of that document.
# Documents the head processed without rows (no entities) get the struct with n = 0; documents it did
# not process (or failed) get NULL, so a predicate on them is false.
UPSTREAM_FIELDS: dict[str, str] = {
    "classifications": "'label': any_value(r.label), 'score': any_value(r.score), 'scores': any_value(r.scores)",
    "entities": ("'n': count(r.doc_id), 'groups': list(DISTINCT r.entity_group) FILTER (WHERE r.doc_id IS NOT NULL), "
                 "'texts': list(r.text ORDER BY r.start_char) FILTER (WHERE r.doc_id IS NOT NULL)"),
    "answers": ("'answer': arg_max(r.answer, r.score), 'score': max(r.score), "
                "'has_answer': coalesce(bool_or(coalesce(r.answer, '') <> ''), false)"),
    "translations": "'text': any_value(r.translation)",
    "lm_scores": ("'perplexity': any_value(r.perplexity), 'pseudo_perplexity': any_value(r.pseudo_perplexity), "
                  "'n_tokens': any_value(r.n_tokens)"),
    "generations": "'text': arg_min(r.text, r.prompt_id), 'n': count(r.doc_id)",
    "fill_mask": "'n': count(r.doc_id)",
    "languages": "'language': any_value(r.language), 'confidence': any_value(r.confidence)",
    "choices": "'choice': arg_max(r.choice, r.score), 'score': max(r.score)",
}


def upstream_sql(table: str, schema: str = "results") -> str:
    """One row per document an upstream head completed: (doc_id, s STRUCT); the head name is parameter 1."""
    return (f"SELECT d.doc_id, {{{UPSTREAM_FIELDS[table]}}} AS s FROM {schema}.doc_state d "
            f"LEFT JOIN {schema}.{table} r ON r.head = d.head AND r.doc_id = d.doc_id "
            "WHERE d.head = ? AND d.status = 'done' GROUP BY d.doc_id")


FAILED_FIELDS = [pa.field("error", pa.string()), pa.field("stage", pa.string()),
                 pa.field("source_file", pa.string()), pa.field("source_row", pa.int64()),
                 # terminal: not retried until text, model or params change (or --retry-failed);
                 # transient: retried by later runs while attempts < max_attempts
                 pa.field("kind", pa.string()),
                 pa.field("attempts", pa.int32()),  # failed attempts in a row on this text and model
                 pa.field("fingerprint", pa.string())]  # of the text that failed (doc_state's, for planning)
# what a load package says about each document it covers (becomes `doc_state`)
COVERED_SCHEMA = pa.schema([pa.field("doc_id", pa.string()), pa.field("fingerprint", pa.string()),
                            pa.field("status", pa.string())])


def arrow_schema(table: str) -> pa.Schema:
    fields = FAILED_FIELDS if table == "failed_docs" else RESULT_FIELDS[table]
    return pa.schema(KEY_FIELDS + fields + LINEAGE_FIELDS)


_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
               pa.bool_(): "BOOLEAN", pa.float32(): "FLOAT"}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_map(t):
        return f"MAP({_duck_type(t.key_type)}, {_duck_type(t.item_type)})"
    if pa.types.is_list(t):
        return f"{_duck_type(t.value_type)}[]"
    return _DUCK_TYPES[t]


def _table_ddl(table: str) -> str:
    cols = ",\n  ".join(f"{quote(f.name)} {_duck_type(f.type)}" for f in arrow_schema(table))
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  {cols}\n)"


# key/value facts about the database itself: schema_version, database_id (UUID), created_at, ...
META_TABLE = "taskheads_meta"

# A new database gets exactly this; an older one gets the steps of migrations.STEPS. Change both together.
DDL = [
    f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY,
  started_at TIMESTAMPTZ,
  finished_at TIMESTAMPTZ,
  status VARCHAR,            -- running | completed | completed_with_errors | failed | interrupted
  config_path VARCHAR,
  corpus VARCHAR,
  docs_read BIGINT,         -- corpus rows scanned
  docs_inferred BIGINT,     -- (head, document) pairs run through a model
  docs_skipped BIGINT,      -- (head, document) pairs unchanged since the last run: not inferred
  docs_failed BIGINT,       -- (head, document) pairs that went to failed_docs
  head_stats VARCHAR,       -- JSON: the same counts per head
  file_errors VARCHAR[],
  error VARCHAR,
  quarantined VARCHAR[]     -- load packages that could not be loaded: "<shard>: <reason>" (moved to quarantine/)
)""",
    """CREATE TABLE IF NOT EXISTS models (
  model_id VARCHAR PRIMARY KEY,
  head VARCHAR,
  task VARCHAR,
  source VARCHAR,
  revision VARCHAR,
  resolved_revision VARCHAR,
  weights_sha256 VARCHAR,
  params VARCHAR,
  dtype VARCHAR,
  registered_at TIMESTAMPTZ
)""",
    """CREATE TABLE IF NOT EXISTS loaded_shards (
  shard_id VARCHAR PRIMARY KEY,
  run_id VARCHAR,
  head VARCHAR,
  result_rows BIGINT,
  failed_rows BIGINT,
  loaded_at TIMESTAMPTZ
)""",
    """CREATE TABLE IF NOT EXISTS evaluations (
  head VARCHAR,
  model_id VARCHAR,
  metric VARCHAR,           -- accuracy | macro_f1 | entity_f1 | exact_match | f1 ...
  value DOUBLE,
  n BIGINT,                 -- labelled examples the metric is computed on
  source VARCHAR,           -- training (held-out split) | corpus (gold_column of a run)
  run_id VARCHAR,
  evaluated_at TIMESTAMPTZ
)""",
    """CREATE TABLE IF NOT EXISTS doc_state (
  head VARCHAR,
  doc_id VARCHAR,
  fingerprint VARCHAR,      -- sha256 of the text and the extra columns the head reads
  model_id VARCHAR,
  run_id VARCHAR,
  status VARCHAR,           -- done (failed attempts are in failed_docs; they never replace a success)
  updated_at TIMESTAMPTZ
)""",
    *(_table_ddl(t) for t in RESULT_FIELDS),
    _table_ddl("failed_docs"),
]
