"""One typed declaration per head: every registered head has a schema, and the JSON Schema of a
pipeline (`taskheads schema`, built from those declarations) accepts the README's example config
and refuses a bad key, the way the config loader does."""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from core.config import HeadParams
from core.tables import ResultTable
from heads.registry import HEADS, head_class, result_tables
from pipeline.config import config_model, head_model, json_schema
from taskheads.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_config() -> dict:
    """The TOML block of the README's "Configuration (TOML)" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration (TOML)"):]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    return tomllib.loads(block)


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_every_registered_head_has_a_schema():
    schema = json_schema()
    mapping = schema["properties"]["heads"]["patternProperties"]
    (heads,) = mapping.values()
    assert set(heads["discriminator"]["mapping"]) == set(HEADS)
    declared = {t.name for t in result_tables()}
    for task in HEADS:
        cls = head_class(task)
        assert issubclass(cls.Params, HeadParams)
        assert cls.tables and all(isinstance(t, ResultTable) for t in cls.tables)
        assert cls.table_for(dict(cls.params)) in {t.name for t in cls.tables} <= declared
        props = schema["$defs"][f"{task}_head"]["properties"]
        assert props["task"]["const"] == task
        for key, field in head_model(task).model_fields.items():  # every key documented, own and common
            assert key in props and field.description, f"{task}.{key} has no description"


def test_readme_example_config_validates(validator):
    raw = readme_config()
    assert {h["task"] for h in raw["heads"].values()} == set(HEADS)  # the example shows every head
    assert [e.message for e in validator.iter_errors(raw)] == []
    config_model().model_validate(raw)  # the loader's own models agree


@pytest.mark.parametrize("change, path", [
    (lambda r: r["heads"]["people"].update(agregation="simple"), "heads.people"),  # a typo
    (lambda r: r["heads"]["topic"].update(stride=True), "heads.topic.stride"),  # a bool is no integer
    (lambda r: r["heads"]["facts"].update(max_answer_len=15.5), "heads.facts.max_answer_len"),
    (lambda r: r["heads"]["topic"].update(task="summarise"), "heads.topic.task"),
    (lambda r: r.update(colour=1), ""),
    (lambda r: r["heads"].update({"my-topic": {"task": "language"}}), "heads"),
    (lambda r: r.pop("corpus"), ""),
])
def test_a_bad_key_fails_the_schema(validator, change, path):
    raw = copy.deepcopy(readme_config())
    change(raw)
    errors = list(validator.iter_errors(raw))
    assert errors, "the schema accepted a bad config"
    assert any(".".join(map(str, e.absolute_path)).startswith(path) for e in _with_context(errors))


def _with_context(errors):
    """Errors and, for a oneOf over the heads, the errors of its branches (where the key is named)."""
    for e in errors:
        yield e
        yield from _with_context(e.context or [])


def test_schema_command_prints_the_schema(capsys, tmp_path):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
    assert main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == json_schema()
