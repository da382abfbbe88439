"""`taskheads migrate DB LAKE`: copy a `.duckdb` results file into a DuckLake, in one lake transaction.

The lake gets this code's schema first (its own database id: its staging folder is its own), then every
table of the file by column name: runs, models, doc_state, loaded_shards, failed_docs, evaluations and
each result table (one the current heads do not declare is created as it is). The file is only read.
"""
from __future__ import annotations

from typing import Sequence

from core.tables import ResultTable

from . import lake, migrations
from .db import _migrate, connect
from .sandbox import sql_string
from .schema import META_TABLE
from .views import create_views


class LakeNotEmpty(ValueError):
    """The target lake already holds runs or results: migrating into it would mix two databases."""


def copy_to_lake(database: str, target: str, *, tables: Sequence[ResultTable], data_path: str | None = None) -> dict[str, int]:
    """Copy every table of the file `database` into the lake `target`; returns rows copied per table."""
    src = connect(database, read_only=True)
    try:
        version = migrations.stored_version(src, database)
    finally:
        src.close()
    if version != migrations.SCHEMA_VERSION:
        raise LakeNotEmpty(f"{database}: schema version {version}, this taskheads writes {migrations.SCHEMA_VERSION}: "
                           "open it for writing once (a run, or `taskheads load CONFIG`) to migrate it, then copy it")
    con = connect(target, data_path=data_path)
    try:
        _migrate(con, target, tables)
        con.execute(f"ATTACH {sql_string(database)} AS src (READ_ONLY)")
        busy = [t for t in ("runs", "doc_state", "loaded_shards") if con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]]
        if busy:
            raise LakeNotEmpty(f"{target}: already holds {', '.join(busy)} rows; migrate into a new lake")
        source = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'src' "
                                            "AND schema_name = 'main' ORDER BY table_name").fetchall()]
        present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
                                             "AND schema_name = 'main'", [lake.ALIAS]).fetchall()}
        counts: dict[str, int] = {}
        con.execute("BEGIN TRANSACTION")
        try:
            for table in source:
                if table == META_TABLE:  # the lake keeps its own id; mapped legacy model ids come along
                    con.execute(f"INSERT INTO {META_TABLE} SELECT * FROM src.{META_TABLE} WHERE key LIKE 'legacy_model:%'")
                    con.execute(f"INSERT INTO {META_TABLE} VALUES ('migrated_from_file', ?)", [database])
                    continue
                if table in present:
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM src.{table}")
                else:
                    con.execute(f"CREATE TABLE {table} AS SELECT * FROM src.{table}")
                counts[table] = con.execute(f"SELECT count(*) FROM src.{table}").fetchone()[0]
            extra = [t for t in source if t not in present and t != META_TABLE]
            if extra:  # result tables of heads this code does not declare: their views too
                from .views import result_tables_in

                create_views(con, [t for t in result_tables_in(con) if t in extra])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return counts
    finally:
        con.close()
