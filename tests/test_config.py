"""Bad configs fail before any work, in one line that names the key; exit status non-zero."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taskheads.cli import main
from pipeline.config import ConfigError, load_config


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a b", "c d"], "lang": ["en", "de"]}), path)
    return path


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "pipeline.toml"
    p.write_text(body)
    return p


def head(model: str, extra: str = "", task: str = "classification") -> str:
    return f'[heads.topic]\ntask = "{task}"\nmodel = "{model}"\n{extra}\n'


def top(corpus) -> str:
    return f'corpus = "{corpus}"\ndatabase = "out.duckdb"\n'


@pytest.mark.parametrize("body_fn, expected", [
    (lambda c, m: top(c) + head(m, task="summarise"), "heads.topic.task: unknown task 'summarise'"),
    (lambda c, m: top(c) + head(m, 'agregation = "simple"'), "heads.topic.agregation: unknown key"),
    (lambda c, m: top(c) + "colour = 1\n" + head(m), "colour: unknown key"),
    (lambda c, m: top(c) + head("./no/such/model"), "heads.topic.model: model folder not found"),
    (lambda c, m: top(c) + head(m, 'where = "no_such_column = 1"'), "heads.topic.where: invalid predicate"),
    (lambda c, m: top(c) + head(m, 'where = "lang = "'), "heads.topic.where: invalid predicate"),
    (lambda c, m: top(c) + head(m, 'long_text = "ignore"'), "heads.topic.long_text: expected 'chunk' or 'truncate', got str 'ignore'"),
    (lambda c, m: top(c) + head(m, 'aggregation = "mean"', task="ner"), "heads.topic.aggregation: expected one of none, simple"),
    (lambda c, m: top(c) + head(m, "num_beams = 0", task="translation"), "heads.topic.num_beams: expected an integer >= 1, got int 0"),
    (lambda c, m: top(c) + head(m, "max_answer_len = 15.5", task="qa"), "heads.topic.max_answer_len: expected an integer >= 1, got float 15.5"),
    (lambda c, m: top(c) + head(m, "batch_tokens = \"big\""), "heads.topic.batch_tokens: expected an integer"),
    (lambda c, m: top(c) + head(m, "stride = true"), "heads.topic.stride: expected an integer >= 0, got bool True"),
    (lambda c, m: top(c) + head(m, "stride = 1.5", task="ner"), "heads.topic.stride: expected an integer >= 0"),
    (lambda c, m: top(c) + "unit_docs = false\n" + head(m), "unit_docs: expected an integer >= 1, got bool False"),
    (lambda c, m: top(c) + head(m, "trust_remote_code = 1"), "heads.topic.trust_remote_code: expected true or false"),
    (lambda c, m: top(c), "heads: no heads configured"),
    (lambda c, m: top(c) + head(m).replace("[heads.topic]", "[heads.my-topic]"),
     "heads.my-topic: head names must match"),
    (lambda c, m: 'database = "x.duckdb"\n' + head(m), "corpus: missing"),
    (lambda c, m: top(str(c.parent / "nothing-*.parquet")) + head(m), "corpus: corpus"),
])
def test_bad_config_is_one_clear_line(tmp_path, corpus, tiny_models, capsys, body_fn, expected):
    cfg = write(tmp_path, body_fn(corpus, tiny_models["classification"]))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_model_folder_without_safetensors(tmp_path, corpus):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"heads.topic.model: no \*.safetensors weights"):
        load_config(write(tmp_path, top(corpus) + head(str(folder))))


def test_paths_resolve_against_config_folder(tmp_path, corpus, tiny_models):
    cfg = load_config(write(tmp_path, 'corpus = "corpus.parquet"\ndatabase = "db/out.duckdb"\n'
                                      + head(tiny_models["classification"], 'where = "lang = \'en\'"')))
    assert cfg.corpus == str(tmp_path / "corpus.parquet")
    assert cfg.database == str(tmp_path / "db" / "out.duckdb")
    (h,) = cfg.heads
    assert h.where == "lang = 'en'" and h.is_local and h.params == {}


def test_console_script_reports_missing_column_in_one_line(tmp_path, tiny_models):
    pq.write_table(pa.table({"id": [1], "body": ["text in the wrong column"]}), tmp_path / "c.parquet")
    cfg = write(tmp_path, top(tmp_path / "c.parquet") + head(tiny_models["classification"]))
    exe = Path(sys.executable).with_name("taskheads")
    proc = subprocess.run([str(exe), "run", str(cfg)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ})
    assert proc.returncode == 2
    assert "missing column 'text'" in proc.stderr and "c.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["../x", "a/b", "a-b", "1st", "a b", "topic.x", "", "naïve"])
def test_head_names_are_identifiers(tmp_path, corpus, tiny_models, capsys, name):
    """Head names become file names and SQL column names: only [A-Za-z_][A-Za-z0-9_]*."""
    body = top(corpus) + f'[heads."{name}"]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
    cfg = write(tmp_path, body)
    with pytest.raises(ConfigError, match=r"^heads\." + __import__("re").escape(name) + r": head names must match"):
        load_config(cfg)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "head names must match" in err and err.count("\n") == 1


def test_identifier_head_names_are_accepted(tmp_path, corpus, tiny_models):
    body = top(corpus) + "".join(f'[heads.{n}]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n'
                                 for n in ("topic_2", "_x", "T"))
    assert [h.name for h in load_config(write(tmp_path, body)).heads] == ["topic_2", "_x", "T"]
