"""All DuckDB DDL in one place: the tables storage owns, and the result tables heads declare.

Result tables are declared by the heads that write them (`core.tables.ResultTable`, in heads/<task>.py)
and handed to storage as data (storage never imports heads): every one gets the key columns
`head, doc_id` first, its own columns, then the lineage `run_id, model_id`, then `load_id`.

`load_id` numbers the loads (transactions) in order, and a row, its `doc_state` and the package's
`loaded_shards` row carry the load that wrote them. Rows are appended in load order, so each row
group's min/max of `load_id` is narrow: replacing a package's documents deletes among the row groups
of the loads that wrote them (which the planner read from `doc_state`), not across the whole table.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from core.names import quote
from core.tables import ResultTable

KEY_FIELDS = [pa.field("head", pa.string()), pa.field("doc_id", pa.string())]
LINEAGE_FIELDS = [pa.field("run_id", pa.string()), pa.field("model_id", pa.string())]


def upstream_sql(table: ResultTable, schema: str = "results") -> str:
    """One row per document an upstream head completed: (doc_id, s STRUCT); the head name is parameter 1.

    The struct is what a downstream head's `where` sees of the head, named after it (`topic.label`,
    `ner.n`), aggregated over its rows `r` of the document (the table's `upstream` declaration).
    Documents the head processed without rows (no entities) get the struct with n = 0; documents it
    did not process (or failed) get NULL, so a predicate on them is false."""
    if table.upstream is None:
        raise ValueError(f"a head writing {table.name} exposes no fields to route on")
    return (f"SELECT d.doc_id, {{{table.upstream}}} AS s FROM {schema}.doc_state d "
            f"LEFT JOIN {schema}.{table.name} r ON r.head = d.head AND r.doc_id = d.doc_id "
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


def arrow_schema(table: ResultTable) -> pa.Schema:
    """The rows a result table receives: what a head's decode returns, plus keys and lineage."""
    return pa.schema(KEY_FIELDS + list(table.columns) + LINEAGE_FIELDS)


FAILED_SCHEMA = pa.schema(KEY_FIELDS + FAILED_FIELDS + LINEAGE_FIELDS)


_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
               pa.bool_(): "BOOLEAN", pa.float32(): "FLOAT"}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_map(t):
        return f"MAP({_duck_type(t.key_type)}, {_duck_type(t.item_type)})"
    if pa.types.is_list(t):
        return f"{_duck_type(t.value_type)}[]"
    return _DUCK_TYPES[t]


def _table_ddl(name: str, schema: pa.Schema) -> str:
    cols = ",\n  ".join(f"{quote(f.name)} {_duck_type(f.type)}" for f in schema)
    return f"CREATE TABLE IF NOT EXISTS {name} (\n  {cols}\n)"  # names: core.tables.TABLE_NAME


LOAD_FIELD = pa.field("load_id", pa.int64())  # the load that wrote the row (storage's own: not in packages)


def result_ddl(tables: Iterable[ResultTable]) -> list[str]:
    """CREATE TABLE IF NOT EXISTS for each result table (a new head's table, on any database)."""
    return [_table_ddl(t.name, arrow_schema(t).append(LOAD_FIELD)) for t in tables]


def ddl(tables: Iterable[ResultTable]) -> list[str]:
    """Exactly what a new database gets: storage's tables and the given result tables."""
    return [*CORE_DDL, *result_ddl(tables), _table_ddl("failed_docs", FAILED_SCHEMA)]


# key/value facts about the database itself: schema_version, database_id (UUID), created_at, ...
META_TABLE = "taskheads_meta"

# storage's own tables. A new database gets these (see `ddl`); an older one gets the steps of
# migrations.STEPS. Change both together.
CORE_DDL = [
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
  loaded_at TIMESTAMPTZ,
  load_id BIGINT,           -- the load (transaction) that wrote it: increasing, shared by packages loaded together
  plan_id VARCHAR           -- the plan its units came from (packages of one plan never share a document)
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
  updated_at TIMESTAMPTZ,
  load_id BIGINT            -- the load that wrote it and the document's result rows
)""",
]


# A lake (storage.lake) has no PRIMARY KEY or UNIQUE constraints: the same tables without them, and the
# claims exactly-once loading needs there (a package's claim row is updated inside its load: two loaders
# updating it conflict on commit, and the loser sees the package loaded when it retries).
CLAIMS_DDL = """CREATE TABLE IF NOT EXISTS taskheads_claims (
  package VARCHAR,          -- the load package (shard id)
  run_id VARCHAR,           -- the run that staged it
  claimed_at TIMESTAMPTZ,
  loaded_by VARCHAR,        -- host:pid of the process whose load committed
  loaded_at TIMESTAMPTZ
)"""


def lake_sql(sql: str) -> str:
    """A CORE_DDL statement as a lake takes it: without key constraints."""
    return sql.replace(" PRIMARY KEY", "")
