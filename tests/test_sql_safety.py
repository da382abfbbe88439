"""SQL from outside the code (a head's `where`, `taskheads sql`) cannot write, attach or read other files.

Each attack is run against real files: a results database that must keep its tables, a file that must
not be read (its content would change the routing if it were), a path that must not be written.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import db
from storage.plan import PlanHead, plan_work
from taskheads.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.preflight import preflight
from heads.registry import result_tables

TABLES = result_tables()  # every registered head's result table


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a b", "c d", "e f"], "lang": ["en", "de", "en"]}),
                   folder / "c.parquet")
    return folder / "c.parquet"


@pytest.fixture()
def victim(tmp_path):
    """A results database with its tables; attacks try to drop `runs`."""
    path = str(tmp_path / "victim.duckdb")
    db.ensure_schema(path, tables=TABLES)
    return path


@pytest.fixture()
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("xsecret: not for the config\n")
    return path


def tables(database: str) -> set[str]:
    con = duckdb.connect(database, read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    finally:
        con.close()


def config(tmp_path, corpus, model, where: str, database: str = "out.duckdb", extra: str = ""):
    path = tmp_path / "pipeline.toml"
    where_toml = where.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(f'corpus = "{corpus}"\ndatabase = "{database}"\n{extra}\n'
                    f'[heads.topic]\ntask = "classification"\nmodel = "{model}"\nwhere = "{where_toml}"\n')
    return path


# --- a head's `where` -----------------------------------------------------------------------------------

def test_where_with_statements_after_it_is_refused_and_drops_nothing(tmp_path, corpus, victim, tiny_models,
                                                                     capsys):
    where = f"true)); ATTACH '{victim}' AS v; DROP TABLE v.runs; DETACH v; SELECT ((true"
    cfg = config(tmp_path, corpus, tiny_models["classification"], where)
    with pytest.raises(ConfigError, match=r"^heads\.topic\.where: "):
        preflight(load_config(cfg))
    assert "runs" in tables(victim)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskheads: config error: heads.topic.where: ") and err.count("\n") == 1
    assert "runs" in tables(victim)


def test_where_reading_a_file_is_refused(tmp_path, corpus, secret, tiny_models, capsys):
    where = f"(SELECT content FROM read_text('{secret}')) LIKE 'x%'"
    cfg = config(tmp_path, corpus, tiny_models["classification"], where)
    with pytest.raises(ConfigError, match=r"^heads\.topic\.where: .*subquer"):
        load_config(cfg)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "heads.topic.where:" in err and err.count("\n") == 1


@pytest.mark.parametrize("where, reason", [
    ("lang = 'en'; SELECT 1", "exactly one"),
    ("lang = 'en' UNION SELECT true", "exactly one"),
    ("lang FROM read_text('/etc/passwd')", "exactly one"),
    ("lang = 'en' WHERE true", "exactly one"),
    ("lang = 'en' LIMIT 1", "exactly one"),
    ("true AS routed", "exactly one"),
    ("EXISTS (SELECT 1)", "subquer"),
    ("id IN (SELECT 1)", "subquer"),
    ("id = ?", "parameter"),
    ("id = $1", "parameter"),
    ("lang = 'en' /* unterminated", "invalid"),
])
def test_where_must_be_exactly_one_expression(tmp_path, corpus, tiny_models, where, reason):
    with pytest.raises(ConfigError, match=rf"^heads\.topic\.where: .*{reason}"):
        load_config(config(tmp_path, corpus, tiny_models["classification"], where))


def test_comment_in_where_cannot_swallow_the_rest_of_the_routing(tmp_path, corpus, tiny_models):
    """`where` ends in a comment; routing adds `lang = 'de'` (source_lang) after it: both must apply."""
    path = config(tmp_path, corpus, tiny_models["classification"], "lang = 'en' -- English only",
                  extra='lang_column = "lang"')
    path.write_text(path.read_text() + 'source_lang = "de"\n')
    cfg = load_config(path)
    files = preflight(cfg)
    (h,) = cfg.heads
    plans, rows, errors = plan_work(None, files, [PlanHead("topic", cfg.routing(h), (), "m")], "id", "text", 10)
    assert rows == 3 and not errors
    assert plans["topic"].routed == 0  # en AND de: nothing; a swallowed `AND lang = 'de'` would route 2


def test_planner_refuses_unsafe_predicates_even_without_the_config(tmp_path, corpus, victim, secret):
    """Defence in depth: a PlanHead built by code that skipped the config check still cannot do harm."""
    for where in (f"true)); ATTACH '{victim}' AS v; DROP TABLE v.runs; DETACH v; SELECT ((true",
                  f"(SELECT content FROM read_text('{secret}')) LIKE 'x%'"):
        with pytest.raises(ValueError, match="where"):
            plan_work(victim, [str(corpus)], [PlanHead("topic", where, (), "m")], "id", "text", 10)
    assert "runs" in tables(victim)


def test_sandbox_reads_only_the_allowed_files(tmp_path, corpus, victim, secret):
    from storage.sandbox import literal_path, sandboxed_connection

    con = sandboxed_connection(read_files=[str(corpus)], database=victim)
    try:
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [literal_path(str(corpus))]).fetchone() == (3,)
        assert con.execute("SELECT count(*) FROM results.runs").fetchone() == (0,)
        out = tmp_path / "out.csv"
        attacks = [f"SELECT * FROM read_text('{secret}')",
                   f"COPY (SELECT 1) TO '{out}'",
                   f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
                   "DROP TABLE results.runs",
                   "SET enable_external_access = true",
                   "SET allowed_directories = ['/']",
                   "RESET lock_configuration",
                   "INSTALL httpfs"]
        for sql in attacks:
            with pytest.raises(duckdb.Error):
                con.execute(sql)
        assert not out.exists() and not (tmp_path / "other.duckdb").exists()
        # DuckDB cannot allow a path for reading only (COPY ... TO an allowed file with USE_TMP_FILE false
        # would overwrite it): statements are kept out by check_expression / check_select, tested above
    finally:
        con.close()
    assert "runs" in tables(victim)


# --- taskheads sql --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM runs) TO '{out}'",
    "COPY runs TO '{out}' (FORMAT parquet)",
    "EXPORT DATABASE '{out}'",
    "ATTACH '{out}' AS other",
    "INSTALL httpfs",
    "LOAD parquet",
    "SET enable_external_access = false",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "PIVOT runs ON status USING count(*)",
])
def test_sql_refuses_anything_but_one_select(tmp_path, victim, capsys, sql):
    out = tmp_path / "exfiltrated"
    assert main(["sql", victim, sql.format(out=out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskheads: refused: ") and err.count("\n") == 1
    assert not out.exists()
    assert "runs" in tables(victim)


def test_sql_cannot_read_files_it_was_not_given(victim, secret, corpus, capsys):
    assert main(["sql", victim, f"SELECT content FROM read_text('{secret}')"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taskheads: refused: ") and "--read" in err and err.count("\n") == 1
    assert "xsecret" not in err
    assert main(["sql", victim, f"SELECT count(*) FROM read_parquet('{corpus}')"]) == 2
    capsys.readouterr()


def test_sql_reads_the_files_given_with_read(tmp_path, victim, corpus, secret, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a folder (relative, as in the README example) or a single file
    assert main(["sql", victim, "SELECT count(*) AS n, sum(id) AS s FROM read_parquet('corpus/*.parquet')",
                 "--read", "corpus"]) == 0
    out = capsys.readouterr().out
    assert "3" in out and "6" in out
    assert main(["sql", victim, f"SELECT content FROM read_text('{secret}')", "--read", str(secret)]) == 0
    assert "xsecret" in capsys.readouterr().out
    # still no writing into a folder it may read
    assert main(["sql", victim, "COPY (SELECT 1) TO 'corpus/new.csv'", "--read", "corpus"]) == 2
    assert not (tmp_path / "corpus" / "new.csv").exists()
    capsys.readouterr()
    assert main(["sql", victim, "SELECT 1", "--read", "no/such/folder"]) == 2
    assert "--read no/such/folder" in capsys.readouterr().err


def test_sql_select_still_answers(victim, capsys):
    assert main(["sql", victim, "SELECT count(*) AS n FROM runs"]) == 0
    assert "(1 row)" in capsys.readouterr().out
    assert main(["sql", victim, "DESCRIBE runs"]) == 0
    assert main(["sql", victim, "SELECT * FROM no_such_table"]) == 1  # a bad query is still exit 1
