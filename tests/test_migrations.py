"""Schema versions: an older database is migrated in one transaction, a newer one is refused.

The fixture `fixtures/v0-16ead0c.duckdb.gz` is a real database written by the oldest code that wrote
one (commit 16ead0c, before versioning; see fixtures/README.md): its `failed_docs` has no
`source_row`, `runs` lacks the later counters, and tables added since are missing.
"""
from __future__ import annotations

import gzip
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import db, migrations, schema
from storage.schema import arrow_schema
from heads.registry import result_tables, table

TABLES = result_tables()  # every registered head's result table

FIXTURE = Path(__file__).parent / "fixtures" / "v0-16ead0c.duckdb.gz"
OLD_RUN = "f006b145-f4b6-45c5-9360-85b4743ff89a"
# the columns every table had in the oldest schema: their rows must survive migration as they were
OLD_COLUMNS = {
    "runs": "run_id, started_at, finished_at, status, config_path, corpus, docs_read, docs_failed, file_errors, error",
    "models": "*",
    "loaded_shards": "*",
    "classifications": "*",
    "entities": "*",
    "failed_docs": "head, doc_id, error, stage, source_file, run_id, model_id",
}


def old_database(tmp_path: Path, name: str = "old.duckdb") -> str:
    path = tmp_path / name
    path.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    return str(path)


# columns later versions add to tables the fixture has (NULL on its rows: checked where it migrates)
ADDED_COLUMNS = {"load_id", "plan_id"}


def rows(database: str, tables: dict[str, str] = OLD_COLUMNS) -> dict[str, list]:
    """The tables' rows; "*" is the columns the fixture's tables had."""
    con = duckdb.connect(database, read_only=True)

    def columns(table: str, cols: str) -> str:
        if cols != "*":
            return cols
        names = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                            "ORDER BY ordinal_position", [table]).fetchall()
        return ", ".join(f'"{n}"' for (n,) in names if n not in ADDED_COLUMNS)

    try:
        return {t: con.execute(f"SELECT {columns(t, c)} FROM {t} ORDER BY ALL").fetchall() for t, c in tables.items()}
    finally:
        con.close()


def shape(database: str) -> dict[str, set]:
    """Everything a schema is made of, order-insensitive: table columns with types, constraints, views."""
    con = duckdb.connect(database, read_only=True)
    try:
        return {
            "columns": set(con.execute(
                "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, c.column_default "
                "FROM duckdb_columns() c JOIN duckdb_tables() t USING (database_name, schema_name, table_name) "
                "WHERE c.database_name = current_database()").fetchall()),
            "constraints": set(con.execute(
                "SELECT table_name, constraint_type, constraint_column_names::VARCHAR FROM duckdb_constraints() "
                "WHERE database_name = current_database()").fetchall()),
            "views": set(con.execute(
                "SELECT c.table_name, c.column_name, c.data_type FROM duckdb_columns() c JOIN duckdb_views() v "
                "ON v.view_name = c.table_name AND v.database_name = c.database_name "
                "WHERE c.database_name = current_database() AND NOT v.internal").fetchall()),
        }
    finally:
        con.close()


def meta(database: str) -> dict[str, str]:
    con = duckdb.connect(database, read_only=True)
    try:
        return dict(con.execute("SELECT key, value FROM taskheads_meta").fetchall())
    finally:
        con.close()


def test_fixture_is_the_pre_versioning_schema(tmp_path):
    """Guards the fixture itself: the oldest shape, its rows, and a storage format DuckDB 1.x reads too."""
    old = old_database(tmp_path)
    con = duckdb.connect(old, read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    failed_cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = "
                                             "'failed_docs'").fetchall()]
    storage_version = con.execute("SELECT tags['storage_version'] FROM duckdb_databases() "
                                  "WHERE database_name = current_database()").fetchone()[0]
    con.close()
    assert tables == {"runs", "models", "loaded_shards", "classifications", "entities", "answers", "translations",
                      "failed_docs"}
    assert "source_row" not in failed_cols
    assert storage_version.startswith("v1.")
    old_rows = rows(old)
    assert len(old_rows["classifications"]) == 4 and len(old_rows["entities"]) == 8
    assert len(old_rows["failed_docs"]) == 2 and [r[0] for r in old_rows["runs"]] == [OLD_RUN]


def test_oldest_database_migrates_to_exactly_the_schema_of_a_new_one(tmp_path):
    old = old_database(tmp_path)
    before = rows(old)
    db.ensure_schema(old, tables=TABLES)
    fresh = str(tmp_path / "fresh.duckdb")
    db.ensure_schema(fresh, tables=TABLES)
    assert shape(old) == shape(fresh)  # whatever the latest version is
    assert rows(old) == before  # every old row kept, unchanged
    con = duckdb.connect(old, read_only=True)
    for table in ("loaded_shards", "classifications", "entities"):  # rows from before load ids: NULL
        assert con.execute(f"SELECT count(*) FROM {table} WHERE load_id IS NOT NULL").fetchone()[0] == 0
    con.close()
    got = meta(old)
    assert got["schema_version"] == str(migrations.SCHEMA_VERSION) == meta(fresh)["schema_version"]
    assert got["migrated_from"] == "0" and "migrated_at" in got
    assert uuid.UUID(got["database_id"]) != uuid.UUID(meta(fresh)["database_id"])
    db.ensure_schema(old, tables=TABLES)  # opening it again changes nothing
    assert meta(old) == got and rows(old) == before


def test_new_database_records_its_version_and_id_in_a_format_duckdb_1_4_reads(tmp_path):
    database = str(tmp_path / "new.duckdb")
    db.ensure_schema(database, tables=TABLES)
    got = meta(database)
    assert got["schema_version"] == str(migrations.SCHEMA_VERSION)
    assert str(uuid.UUID(got["database_id"])) == got["database_id"] == db.database_id(database)
    assert "created_at" in got and "migrated_from" not in got
    con = duckdb.connect(database, read_only=True)
    storage_version = con.execute("SELECT tags['storage_version'] FROM duckdb_databases() "
                                  "WHERE database_name = current_database()").fetchone()[0]
    con.close()
    # readable by DuckDB 1.4 and later (2.x too); v1.0.0's checkpoint grew with the table (storage.db)
    assert storage_version == "v1.4.0+"


def test_failing_step_leaves_the_database_unchanged(tmp_path, monkeypatch):
    old = old_database(tmp_path)
    before_rows, before_shape = rows(old), shape(old)

    def broken(con):
        con.execute("INSERT INTO runs (run_id) VALUES ('half-migrated')")
        raise RuntimeError("step exploded")

    # version 0 -> 1 runs fully, then the injected step fails: all of it must roll back
    monkeypatch.setattr(migrations, "STEPS", [*migrations.STEPS, broken])
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", len(migrations.STEPS))
    with pytest.raises(migrations.MigrationError) as err:
        db.ensure_schema(old, tables=TABLES)
    assert str(err.value).startswith(f"{old}: schema migration failed at version {len(migrations.STEPS) - 1}")
    assert "database unchanged" in str(err.value)
    assert shape(old) == before_shape and rows(old) == before_rows
    con = duckdb.connect(old, read_only=True)
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'taskheads_meta'").fetchone() == (0,)
    con.close()


def test_newer_database_is_refused_with_one_line(tmp_path, tiny_models, capsys):
    from taskheads.cli import main

    database = tmp_path / "newer.duckdb"
    db.ensure_schema(str(database), tables=TABLES)
    con = duckdb.connect(str(database))
    con.execute("UPDATE taskheads_meta SET value = ? WHERE key = 'schema_version'", [str(migrations.SCHEMA_VERSION + 1)])
    con.close()
    pq.write_table(pa.table({"id": [1], "text": ["Ada founded Initech."]}), tmp_path / "corpus.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'corpus = "corpus.parquet"\ndatabase = "newer.duckdb"\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n')
    line = (f"taskheads: {database}: schema version {migrations.SCHEMA_VERSION + 1} is newer than this taskheads "
            f"supports ({migrations.SCHEMA_VERSION}); upgrade taskheads to use it\n")
    assert main(["run", str(cfg)]) == 2
    assert capsys.readouterr().err == line
    assert main(["sql", str(database), "SELECT 1"]) == 2
    assert capsys.readouterr().err == line
    assert main(["report", str(database), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err == line
    with pytest.raises(migrations.SchemaTooNew):
        db.ensure_schema(str(database), tables=TABLES)
    con = duckdb.connect(str(database), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)  # nothing was written
    con.close()
    assert not (tmp_path / "r.html").exists()


def test_run_on_the_oldest_database_migrates_keeps_old_rows_and_loads(tmp_path, tiny_models, prefect_harness,
                                                                       capsys):
    """A real `taskheads run` over a copy of the fixture: before versioning, every load failed here."""
    from taskheads.cli import main

    old = old_database(tmp_path, "results.duckdb")
    before = rows(old)
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": [10, 11, 12], "text": ["Grace Hopper ran Globex.", "", "Markets fell in Lagos."]}),
                   tmp_path / "corpus" / "new.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
""")
    status = main(["run", str(cfg), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    assert meta(old)["schema_version"] == str(migrations.SCHEMA_VERSION) and meta(old)["migrated_from"] == "0"
    after = rows(old)
    for table in OLD_COLUMNS:  # the old rows are all still there, unchanged
        assert all(row in after[table] for row in before[table]), table
    con = duckdb.connect(old, read_only=True)
    runs = con.execute("SELECT run_id, status FROM runs ORDER BY started_at").fetchall()
    new_docs = con.execute("SELECT head, doc_id FROM classifications WHERE run_id <> ? ORDER BY ALL",
                           [OLD_RUN]).fetchall()
    failed = con.execute("SELECT head, doc_id, source_row, run_id = ? FROM failed_docs ORDER BY ALL",
                         [OLD_RUN]).fetchall()
    state = con.execute("SELECT count(*) FROM doc_state WHERE status = 'done'").fetchone()[0]
    con.close()
    assert runs[0] == (OLD_RUN, "completed") and runs[1][1] == "completed" and len(runs) == 2
    assert new_docs == [("topic", "10"), ("topic", "12")]
    assert failed == [("people", "11", 1, False), ("people", "3", None, True),
                      ("topic", "11", 1, False), ("topic", "3", None, True)]
    assert state == 4  # two documents x two heads


def test_package_staged_by_the_oldest_code_loads_after_the_upgrade(tmp_path):
    """A run of the old code was killed with a package staged (its `failed` part has no source_row): the
    upgraded code migrates the database, then recovers the package instead of failing on it forever."""
    old = old_database(tmp_path)
    dead_run = "dead-run"
    folder = Path(old + ".staging") / dead_run  # the old code staged beside the database
    folder.mkdir(parents=True)
    old_failed = pa.schema([("head", pa.string()), ("doc_id", pa.string()), ("error", pa.string()),
                            ("stage", pa.string()), ("source_file", pa.string()), ("run_id", pa.string()),
                            ("model_id", pa.string())])
    pq.write_table(pa.Table.from_pylist([{"head": "topic", "doc_id": "9", "error": "empty text", "stage": "read",
                                          "source_file": "more.parquet", "run_id": dead_run, "model_id": "m"}],
                                        schema=old_failed), folder / "s9.failed.parquet")
    pq.write_table(pa.Table.from_pylist([{"head": "topic", "doc_id": "8", "label": "sport", "score": 0.9,
                                          "scores": [("sport", 0.9)], "n_chunks": 1, "long_text": "chunk",
                                          "run_id": dead_run, "model_id": "m"}],
                                        schema=arrow_schema(table("classifications"))), folder / "s9.results.parquet")
    pq.write_table(pa.Table.from_pylist([{"doc_id": "8", "fingerprint": "f8", "status": "done"},
                                         {"doc_id": "9", "fingerprint": "f9", "status": "failed"}]),
                   folder / "s9.covered.parquet")
    (folder / "s9.json").write_text(
        '{"shard_id": "s9", "run_id": "dead-run", "head": "topic", "table": "classifications", "model_id": "m", '
        '"result_rows": 1, "failed_rows": 1, "results": "s9.results.parquet", "failed": "s9.failed.parquet", '
        '"covered": "s9.covered.parquet"}')
    db.start_run(old, "now", None, "corpus", tables=TABLES)
    assert db.recover(old, "now", tables=TABLES) == 1
    con = duckdb.connect(old, read_only=True)
    assert con.execute("SELECT doc_id, label FROM classifications WHERE run_id = 'dead-run'").fetchall() == [
        ("8", "sport")]
    assert con.execute("SELECT doc_id, source_row FROM failed_docs WHERE run_id = 'dead-run'").fetchall() == [
        ("9", None)]
    assert con.execute("SELECT quarantined FROM runs WHERE run_id = 'now'").fetchone() == (None,)
    con.close()
    assert not folder.exists()


def test_file_from_a_newer_duckdb_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    """duckdb 1.5.5 opening a file written by 2.0.1 in its default format says this (captured verbatim);
    the same one line and exit status as a newer schema, not a traceback."""
    from taskheads.cli import main

    database = tmp_path / "from-2.x.duckdb"
    database.write_bytes(b"not opened")
    message = ("IO Error: Trying to read a database file with version number 999, but we can only read versions "
               "between 64 and 68.\nThe database file was created with an newer version of DuckDB.\n\nNewer DuckDB "
               "version might introduce backward incompatible changes (possibly guarded by compatibility settings).")

    def newer_file(*args, **kwargs):
        raise duckdb.IOException(message)

    monkeypatch.setattr(db.duckdb, "connect", newer_file)
    assert main(["sql", str(database), "SELECT 1"]) == 2
    assert capsys.readouterr().err == (f"taskheads: {database}: written by a newer DuckDB than this one "
                                       f"({duckdb.__version__}) can read; upgrade taskheads to use it\n")


def test_version_1_failures_move_out_of_doc_state(tmp_path):
    """1 -> 2: a failed document no longer blocks itself: its doc_state row goes, its failed_docs row
    keeps the fingerprint that failed and gets a kind (the text's fault, or retried) and attempts."""
    path = str(tmp_path / "v1.duckdb")
    con = duckdb.connect(path)
    con.execute("CREATE TABLE taskheads_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("CREATE TABLE failed_docs (head VARCHAR, doc_id VARCHAR, error VARCHAR, stage VARCHAR, "
                "source_file VARCHAR, source_row BIGINT, run_id VARCHAR, model_id VARCHAR)")
    for ddl in [d for d in schema.ddl(TABLES) if "EXISTS failed_docs" not in d and "EXISTS taskheads_meta" not in d]:
        con.execute(ddl)
    con.execute("INSERT INTO taskheads_meta VALUES ('schema_version', '1'), ('database_id', 'x')")
    con.execute("INSERT INTO doc_state (head, doc_id, fingerprint, model_id, run_id, status, updated_at) VALUES ('t', 'a', 'fa', 'm', 'r', 'failed', now()), "
                "('t', 'b', 'fb', 'm', 'r', 'failed', now()), ('t', 'c', 'fc', 'm', 'r', 'done', now())")
    con.execute("INSERT INTO failed_docs VALUES ('t', 'a', 'empty text', 'read', 'f', 0, 'r', 'm'), "
                "('t', 'b', 'out of memory on 9 tokens', 'forward', 'f', 1, 'r', 'm')")
    con.close()
    db.ensure_schema(path, tables=TABLES)
    con = duckdb.connect(path, read_only=True)
    try:
        assert con.execute("SELECT doc_id, status FROM doc_state").fetchall() == [("c", "done")]
        assert con.execute("SELECT doc_id, kind, attempts, fingerprint FROM failed_docs ORDER BY doc_id").fetchall() \
            == [("a", "terminal", 1, "fa"), ("b", "transient", 1, "fb")]
    finally:
        con.close()
    assert meta(path)["schema_version"] == str(migrations.SCHEMA_VERSION)
