"""The Python API: `taskheads.run` on a config given as a file, a dict or a typed object, `results`,
`connect`, the corpus flow as a subflow of a user's own flow, a cheap `import taskheads`.

References: the CLI's run of the same config (its rows read with a plain DuckDB connection), the
Prefect API (the parent of the corpus flow run), a second process (the database lock).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import taskheads

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The striker scored twice in the final", "Parliament voted on the budget today",
         "Ada Lovelace founded Initech in Zurich", "shares rose after the merger with Globex",
         "Grace Hopper runs the company from Lagos", "The band released a new album",
         "A new phone was launched by the company", "The minister resigned after the vote",
         "Interest rates rose again in London", "The film won three awards"]


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "text": t, "lang": "de" if i % 3 == 0 else "en"} for i, t in enumerate(TEXTS)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "a.parquet")


def config_dict(models: dict, database: str = "api.duckdb") -> dict:
    """Relative corpus and database: resolved from the working directory."""
    return {"corpus": "corpus", "database": database, "unit_docs": 4,
            "heads": {"topic": {"task": "classification", "model": models["classification"]},
                      "people": {"task": "ner", "model": models["ner"], "where": "lang = 'en'"}}}


def config_toml(models: dict, database: str) -> str:
    return (f'corpus = "corpus"\ndatabase = "{database}"\nunit_docs = 4\n'
            f'[heads.topic]\ntask = "classification"\nmodel = "{models["classification"]}"\n'
            f'[heads.people]\ntask = "ner"\nmodel = "{models["ner"]}"\nwhere = "lang = \'en\'"\n')


def rows(db: str, sql: str) -> list[dict]:
    con = duckdb.connect(db, read_only=True)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def arrow_rows(db: str, sql: str) -> list[dict]:
    """Rows as Arrow gives them (maps as key/value pairs), like `taskheads.results`."""
    con = duckdb.connect(db, read_only=True)
    try:
        return con.sql(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def without_run(table_rows) -> list[dict]:
    """Rows minus what differs between two runs of the same config (the run), sorted."""
    drop = {"run_id", "run_started_at"}
    out = [{k: v for k, v in r.items() if k not in drop} for r in table_rows]
    return sorted(out, key=repr)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models, prefect_harness):
    """A folder with a corpus, the config as TOML, and the CLI's run of it (the reference)."""
    from taskheads.cli import main

    root = tmp_path_factory.mktemp("api")
    write_corpus(root / "corpus")
    (root / "pipeline.toml").write_text(config_toml(tiny_models, "cli.duckdb"))
    assert main(["run", str(root / "pipeline.toml"), "--no-progress"]) == 0
    return root


def test_run_a_dict_config_and_read_results_back(project, tiny_models, monkeypatch):
    monkeypatch.chdir(project)
    summary = taskheads.run(config_dict(tiny_models))
    assert isinstance(summary, taskheads.RunSummary)
    assert summary.status == "completed" and summary.docs_read == len(TEXTS) and summary.files == 1
    assert summary.database == str(project / "api.duckdb")  # relative to the working directory
    assert summary.heads["topic"].inferred == len(TEXTS)
    assert summary.heads["people"].routed == sum(1 for i in range(len(TEXTS)) if i % 3)
    topic = taskheads.results(project / "api.duckdb", "topic")
    assert isinstance(topic, pa.Table) and topic.num_rows == len(TEXTS)
    assert set(topic.column("run_id").to_pylist()) == {summary.run_id}
    cli_db = str(project / "cli.duckdb")
    assert without_run(topic.to_pylist()) == without_run(arrow_rows(cli_db, "SELECT * FROM latest_classifications"))
    people = taskheads.results(str(project / "api.duckdb"), "people")
    assert without_run(people.to_pylist()) == without_run(arrow_rows(cli_db, "SELECT * FROM latest_entities"))
    assert people.num_rows > 0


def test_run_a_typed_pipeline_object(project, tiny_models, monkeypatch):
    monkeypatch.chdir(project)
    head = taskheads.Head(name="topic", task="classification", model=tiny_models["classification"])
    pipeline = taskheads.Pipeline(corpus="corpus", database="typed.duckdb", unit_docs=4, heads=(head,))
    summary = taskheads.run(pipeline)
    assert summary.status == "completed" and summary.heads["topic"].rows == len(TEXTS)
    assert without_run(taskheads.results(project / "typed.duckdb", "topic").to_pylist()) == \
        without_run(arrow_rows(str(project / "cli.duckdb"), "SELECT * FROM latest_classifications"))
    # a second run of the same object infers nothing (incremental, as from the CLI)
    again = taskheads.run(pipeline)
    assert again.heads["topic"].inferred == 0 and again.heads["topic"].unchanged == len(TEXTS)
    # full=True infers everything again
    assert taskheads.run(pipeline, full=True).heads["topic"].inferred == len(TEXTS)


def test_run_a_config_file_with_overrides(project, tmp_path):
    cfg = taskheads.load_config(project / "pipeline.toml")
    assert isinstance(cfg, taskheads.Pipeline) and [h.name for h in cfg.heads] == ["topic", "people"]
    summary = taskheads.run(project / "pipeline.toml", database=tmp_path / "over.duckdb",
                            corpus=project / "corpus" / "a.parquet")
    assert summary.database == str(tmp_path / "over.duckdb") and summary.docs_read == len(TEXTS)
    runs = rows(summary.database, "SELECT config_path, corpus FROM runs")
    assert runs == [{"config_path": str(project / "pipeline.toml"), "corpus": str(project / "corpus" / "a.parquet")}]


def test_a_bad_dict_config_is_one_line_naming_the_key(project, tiny_models, monkeypatch):
    from core.errors import ConfigError

    monkeypatch.chdir(project)
    bad = config_dict(tiny_models, "bad.duckdb")
    bad["heads"]["topic"]["stride"] = True
    with pytest.raises(ConfigError, match=r"^heads\.topic\.stride: ") as info:
        taskheads.run(bad)
    assert "\n" not in str(info.value)
    bad = config_dict(tiny_models, "bad.duckdb")
    bad["heads"]["topic"]["model"] = "./no_such_folder/model"
    with pytest.raises(ConfigError, match=r"heads\.topic\.model: model folder not found"):
        taskheads.run(bad)
    with pytest.raises(TypeError, match="config"):
        taskheads.run(42)
    assert not (project / "bad.duckdb").exists()


def test_results_of_an_unknown_head_names_the_heads_there_are(project):
    with pytest.raises(LookupError, match=r"no results for head 'nope' .*people, topic"):
        taskheads.results(project / "cli.duckdb", "nope")
    with pytest.raises(FileNotFoundError, match="no-such.duckdb"):
        taskheads.results(project / "no-such.duckdb", "topic")


def test_results_of_a_head_that_found_nothing_are_empty(project, tiny_models, monkeypatch):
    """A NER head that ran over every document and found no entity (every label ignored): an empty
    table with the entities columns, not a LookupError listing the head among the heads there are."""
    monkeypatch.chdir(project)
    cfg = config_dict(tiny_models, "empty.duckdb")
    cfg["heads"]["people"]["ignore_labels"] = ["O", "PER", "ORG", "LOC"]  # entity groups, as in HF
    summary = taskheads.run(cfg)
    assert summary.heads["people"].done > 0 and summary.heads["people"].rows == 0
    people = taskheads.results(project / "empty.duckdb", "people")
    assert people.num_rows == 0
    assert people.schema.names == taskheads.results(project / "cli.duckdb", "people").schema.names


def _writer_can_open(db: Path) -> bool:
    """Whether another process can open the database for writing right now."""
    code = "import duckdb, sys; duckdb.connect(sys.argv[1]).close()"
    return subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True).returncode == 0


def test_connect_is_read_only_and_closes(project):
    db = project / "cli.duckdb"
    with taskheads.connect(db) as con:
        n = con.execute("SELECT count(*) FROM latest_classifications").fetchone()[0]
        assert n == len(TEXTS)
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM classifications")
        assert not _writer_can_open(db)  # the reader holds the file while open
    with pytest.raises(duckdb.Error):
        con.execute("SELECT 1")  # closed on leaving the block
    assert _writer_can_open(db)
    with pytest.raises(FileNotFoundError, match="nothing.duckdb"):
        with taskheads.connect(project / "nothing.duckdb"):
            pass
    assert not (project / "nothing.duckdb").exists()


def test_the_corpus_flow_runs_as_a_subflow_of_a_users_flow(project, tiny_models, monkeypatch):
    from uuid import UUID

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    monkeypatch.chdir(project)

    @flow(name="my-analysis")
    def my_analysis() -> tuple[str, str, int]:
        summary = taskheads.run(config_dict(tiny_models, "sub.duckdb"))
        return str(flow_run.get_id()), summary.run_id, taskheads.results("sub.duckdb", "topic").num_rows

    outer_id, corpus_run_id, n = my_analysis()
    assert n == len(TEXTS)
    with get_client(sync_client=True) as client:
        inner = client.read_flow_run(UUID(corpus_run_id))
        assert inner.parent_task_run_id is not None
        parent = client.read_task_run(inner.parent_task_run_id)
    assert str(parent.flow_run_id) == outer_id


def test_importing_taskheads_is_light_and_has_a_version():
    code = ("import sys, taskheads; print(taskheads.__version__); "
            "print(sorted(m for m in ('prefect', 'torch', 'transformers', 'duckdb', 'pydantic') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    version, heavy = out.splitlines()
    assert version == importlib.metadata.version("taskheads")
    assert heavy == "[]"
    assert {"run", "connect", "results", "load_config", "search", "RunSummary", "Pipeline"} <= set(taskheads.__all__)


def test_run_summary_fields_are_the_flows():
    from flows.process_corpus import HeadSummary, RunSummary

    assert taskheads.RunSummary is RunSummary and taskheads.HeadSummary is HeadSummary
    assert "heads" in {f.name for f in fields(RunSummary)}
