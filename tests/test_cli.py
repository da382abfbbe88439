"""The CLI's commands beyond `run`: check, train, --version, sql --format/--out, run --json, and the
warning for unpinned hub models.

References: DuckDB's own reading of the files the CLI writes (CSV with the query's column types,
Parquet, JSON) against the same query through a plain connection; the database for `run --json`;
the saved folder and `evaluations` for `train`.
"""
from __future__ import annotations

import importlib.metadata
import json
import random
from dataclasses import fields

import duckdb
import pyarrow.parquet as pq
import pytest

from taskheads.cli import main
from test_api import TEXTS, config_toml, rows, write_corpus


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models, prefect_harness):
    """A corpus, a config and the database of one CLI run of it."""
    root = tmp_path_factory.mktemp("cli")
    write_corpus(root / "corpus")
    (root / "pipeline.toml").write_text(config_toml(tiny_models, "results.duckdb"))
    assert main(["run", str(root / "pipeline.toml"), "--no-progress"]) == 0
    return root


def _config(tmp_path, body: str) -> str:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(body)
    return str(cfg)


# --- check ----------------------------------------------------------------------------------------

def test_check_a_good_config(project, capsys):
    assert main(["check", str(project / "pipeline.toml")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1 and "ok" in out and "2 heads" in out and "1 corpus file" in out


@pytest.mark.parametrize("body, message", [
    ('corpus = "corpus"\ndatabase = "x.duckdb"\ncorpse = 1\n[heads.topic]\ntask = "classification"\nmodel = "{m}"\n',
     "corpse"),
    ('corpus = "corpus"\ndatabase = "x.duckdb"\n[heads.topic]\ntask = "classification"\nmodel = "{m}"\n'
     'stride = true\n', "heads.topic.stride: "),
    ('corpus = "corpus"\ndatabase = "x.duckdb"\n[heads.topic]\ntask = "classification"\nmodel = "{m}"\n'
     'where = "no_such_column = 1"\n', "heads.topic.where: "),
    ('corpus = "nowhere/*.parquet"\ndatabase = "x.duckdb"\n[heads.topic]\ntask = "classification"\nmodel = "{m}"\n',
     "corpus: "),
    ('corpus = "corpus"\ndatabase = "x.duckdb"\n[heads.topic]\ntask = "classification"\nmodel = "./missing"\n',
     "heads.topic.model: model folder not found"),
    ('corpus = "corpus"\ndatabase = "x.duckdb"\n[heads.topic\n', "invalid TOML"),
    ('corpus = "corpus"\ndatabase = "x.duckdb"\nmemory_limit = "lots"\n[heads.topic]\ntask = "classification"\n'
     'model = "{m}"\n', "memory_limit: expected a size such as '512MB' or '2GB', got str 'lots'"),
])
def test_check_a_bad_config_is_exit_2_and_one_line(project, tiny_models, tmp_path, capsys, body, message):
    (tmp_path / "corpus").symlink_to(project / "corpus")
    cfg = _config(tmp_path, body.replace("{m}", tiny_models["classification"]))
    assert main(["check", cfg]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("taskheads: config error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.duckdb").exists()  # no work, nothing written


def test_check_a_missing_config_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and err.count("\n") == 1


# --- unpinned hub models ----------------------------------------------------------------------------

def test_an_unpinned_hub_model_gets_a_one_line_warning(project, tiny_models, tmp_path, capsys):
    (tmp_path / "corpus").symlink_to(project / "corpus")
    head = '[heads.topic]\ntask = "classification"\nmodel = "some-org/some-model"\n'
    cfg = _config(tmp_path, f'corpus = "corpus"\ndatabase = "x.duckdb"\n{head}')
    assert main(["check", cfg]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("taskheads: warning: heads.topic.model: ")
    assert "some-org/some-model" in err and "revision" in err
    pinned = _config(tmp_path, f'corpus = "corpus"\ndatabase = "x.duckdb"\n{head}revision = "0123abcd"\n')
    assert main(["check", pinned]) == 0
    assert capsys.readouterr().err == ""
    # a local folder, and a model-free head (language detection), are not hub models
    local = _config(tmp_path, f'corpus = "corpus"\ndatabase = "x.duckdb"\n[heads.topic]\ntask = "classification"\n'
                              f'model = "{tiny_models["classification"]}"\n[heads.lang]\ntask = "language"\n')
    assert main(["check", local]) == 0
    assert capsys.readouterr().err == ""


def test_the_api_warns_about_unpinned_hub_models(project, tmp_path, monkeypatch):
    import taskheads
    from core.errors import ModelLoadError

    monkeypatch.chdir(tmp_path)
    cfg = {"corpus": str(project / "corpus"), "database": "x.duckdb",
           "heads": {"topic": {"task": "classification", "model": "some-org/some-model"}}}
    with pytest.warns(UserWarning, match=r"heads\.topic\.model: .*revision"):
        with pytest.raises(ModelLoadError, match=r"heads\.topic\.model: cannot load"):
            taskheads.run(cfg)  # offline: the hub model cannot load, nothing is written
    assert not (tmp_path / "x.duckdb").exists()


# --- version ---------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"taskheads {importlib.metadata.version('taskheads')}\n"


# --- sql --format ------------------------------------------------------------------------------------

QUERY = ("SELECT doc_id, label, score, scores, n_chunks, model_id, [n_chunks, 7] AS a_list, "
         "NULL::VARCHAR AS nothing, 'a \"quoted\", comma\nand newline' AS awkward FROM classifications ORDER BY doc_id")


def reference(db: str, sql: str = QUERY):
    con = duckdb.connect(db, read_only=True)
    try:
        rel = con.sql(sql)
        return dict(zip(rel.columns, (str(t) for t in rel.types))), rel.fetchall(), rel.to_arrow_table()
    finally:
        con.close()


def test_sql_csv_round_trips(project, tmp_path, capsys):
    db = str(project / "results.duckdb")
    types, expected, _ = reference(db)
    out = tmp_path / "out.csv"
    assert main(["sql", db, QUERY, "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    back = duckdb.sql("SELECT * FROM read_csv(?, header = true, columns = ?)", params=[str(out), types])
    assert back.fetchall() == expected and len(expected) == len(TEXTS)
    # without --out, the same bytes on stdout
    assert main(["sql", db, QUERY, "--format", "csv"]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_sql_json_and_parquet_round_trip(project, tmp_path, capsys):
    db = str(project / "results.duckdb")
    types, expected, table = reference(db)
    assert main(["sql", db, QUERY, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [list(r.keys()) for r in got] == [list(types)] * len(expected)
    assert [[r[c] for c in types] for r in got] == [list(r) for r in expected]
    out = tmp_path / "out.parquet"
    assert main(["sql", db, QUERY, "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).equals(table)
    # parquet is binary: a file, never the terminal
    assert main(["sql", db, QUERY, "--format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1


def test_sql_table_format_shows_at_most_limit_rows(project, capsys):
    db = str(project / "results.duckdb")
    assert main(["sql", db, "SELECT doc_id FROM classifications ORDER BY doc_id", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip() == "doc_id" and [line.strip() for line in lines[2:5]] == ["0", "1", "2"]
    assert len(lines) == 6 and "3 rows shown" in lines[5] and "--limit" in lines[5]
    assert main(["sql", db, "SELECT doc_id FROM classifications", "--limit", "0"]) == 0
    assert f"({len(TEXTS)} rows)" in capsys.readouterr().out
    # the sandbox still refuses writing a file with SQL
    assert main(["sql", db, f"COPY classifications TO '{project / 'x.csv'}'", "--format", "csv"]) == 2
    assert not (project / "x.csv").exists()


# --- run --json --------------------------------------------------------------------------------------

def test_run_json_is_the_run_summary_on_stdout(project, tmp_path, capsys):
    from flows.process_corpus import HeadSummary, RunSummary

    db = tmp_path / "json.duckdb"
    status = main(["run", str(project / "pipeline.toml"), "--db", str(db), "--json", "-v"])
    out = capsys.readouterr().out
    assert status == 0
    summary = json.loads(out)  # nothing but the JSON document: Prefect's logs (-v) went elsewhere
    assert set(summary) == {f.name for f in fields(RunSummary)}
    assert all(set(h) == {f.name for f in fields(HeadSummary)} for h in summary["heads"].values())
    run = rows(str(db), "SELECT run_id, status, docs_read FROM runs")
    assert run == [{"run_id": summary["run_id"], "status": summary["status"], "docs_read": summary["docs_read"]}]
    assert summary["heads"]["topic"]["rows"] == rows(str(db), "SELECT count(*) AS n FROM classifications")[0]["n"]
    assert summary["heads"]["people"]["rows"] == rows(str(db), "SELECT count(*) AS n FROM entities")[0]["n"]


def test_run_json_with_a_bad_config_prints_nothing_on_stdout(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "config file not found" in err


def test_train_params_are_toml_values_and_a_bad_one_is_one_line(tmp_path, capsys):
    from taskheads.cli import _head_params

    assert _head_params(['questions=["Who?", "Where?"]', "question_column = q", "stride=32"]) == {
        "questions": ["Who?", "Where?"], "question_column": "q", "stride": 32}
    train = tmp_path / "rows.parquet"
    train.write_bytes(b"")
    status = main(["train", "qa", str(tmp_path), str(tmp_path / "out"), "--train", str(train), "--eval", str(train),
                   "--param", "questions"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--param 'questions': expected KEY=VALUE" in err


# --- train ---------------------------------------------------------------------------------------------

def topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"{rng.choice(['Ann', 'Bob', 'Cy'])} ate an apple", "label": "fruit"} if i % 2 else
            {"text": f"{rng.choice(['Ann', 'Bob', 'Cy'])} watched the rocket launch", "label": "space"}
            for i in range(n)]


def test_train_a_tiny_head_from_the_command_line(prefect_harness, tmp_path, capsys):
    from storage.training_data import write_rows
    from taskheads.tiny_models import build_bert

    base = str(build_bert(tmp_path / "base", "masked_lm", max_len=64, seed=1, hidden=32))
    train = write_rows(str(tmp_path / "train.parquet"), topic_rows(48, seed=1))
    held_out = write_rows(str(tmp_path / "eval.parquet"), topic_rows(12, seed=2))
    db, out_dir = tmp_path / "train.duckdb", tmp_path / "topic"
    status = main(["train", "classification", base, str(out_dir), "--train", train, "--eval", held_out,
                   "--db", str(db), "--head", "topic", "--epochs", "2", "--lr", "2e-3", "--batch-size", "8",
                   "--max-length", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert (out_dir / "model.safetensors").exists()
    config = json.loads((out_dir / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["fruit", "space"]
    evals = rows(str(db), "SELECT head, metric, value, n, source FROM evaluations ORDER BY metric")
    assert [e["metric"] for e in evals] == ["accuracy", "macro_f1"]
    assert all(e["head"] == "topic" and e["source"] == "training" and e["n"] == 12 for e in evals)
    assert f"accuracy {evals[0]['value']:.3f}" in out and str(out_dir) in out


def test_train_refuses_missing_rows_in_one_line(tmp_path, capsys):
    status = main(["train", "classification", str(tmp_path), str(tmp_path / "out"),
                   "--train", str(tmp_path / "nope.parquet"), "--eval", str(tmp_path / "nope.parquet")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train" in err and "nope.parquet" in err
    assert not (tmp_path / "out").exists()
