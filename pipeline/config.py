"""The one config system: a TOML file parsed into a frozen, validated PipelineConfig before any work.

Every key is declared once, typed and documented: the pipeline's keys and the keys every head
accepts in core.config, each head's own keys in its module (`Head.Params`). Here they are put
together per task (`head_model`: HeadKeys + the head's Params, `task` a literal) and for the file
(`config_model`: `heads` a union discriminated on `task`), which is also the JSON Schema that
`taskheads schema` prints. Beyond types: model folders hold safetensors, a `where` is one SQL
expression (storage.sandbox), heads named in where/input/depends_on exist and form no cycle.

Every problem is a ConfigError of one line naming the key, so a typo fails before a model is
loaded or a document is read.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import Field, ValidationError, create_model

from core.config import HeadKeys, Keys, PipelineKeys, config_error
from core.errors import ConfigError
from core.names import HEAD_NAME, quote
from core.tables import ResultTable
from heads.backends import check_backend
from heads.registry import HEADS, head_class
from storage.sandbox import UnsafeSQL, check_expression

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "HeadConfig", "PipelineConfig", "load_config", "parse_config", "json_schema"]


class HeadConfig(HeadKeys):
    """One configured head: the keys every head accepts, its name, and its own keys as given."""

    name: str
    """the head's name: [heads.NAME]"""
    model: str
    """local model folder (resolved against the config's folder) or hub id"""
    params: Mapping[str, Any] = {}
    """the head's own keys as the config gives them (its Params checked them; defaults are the head's)"""

    @property
    def is_local(self) -> bool:
        return Path(self.model).exists()

    @property
    def table(self) -> str:
        """The result table this head writes (known without loading the model)."""
        return head_class(self.task).table_for(dict(self.params))

    @property
    def result_table(self) -> ResultTable:
        name = self.table
        return next(t for t in head_class(self.task).tables if t.name == name)


class PipelineConfig(PipelineKeys):
    """A config file, validated: the pipeline's keys (paths resolved) and its heads in file order."""

    heads: tuple[HeadConfig, ...]
    """the heads, in the order of the file"""
    source: str | None = None
    """the config file, for lineage"""

    def head(self, name: str) -> HeadConfig:
        return next(h for h in self.heads if h.name == name)

    def language_head(self) -> str | None:
        return next((h.name for h in self.heads if h.task == "language"), None)

    def upstream(self, h: HeadConfig) -> tuple[str, ...]:
        """Heads whose results `h` reads: depends_on, heads named in `where`, `input`, its language head."""
        names = list(h.depends_on) + where_references(h.where, [o.name for o in self.heads if o.name != h.name])
        if h.input:
            names.append(h.input)
        if h.source_lang and not self.lang_column:
            names.append(self.language_head())
        return tuple(dict.fromkeys(names))

    def routing(self, h: HeadConfig) -> str | None:
        """The full SQL predicate routing documents to `h`: its `where`, its language, its input present."""
        parts = [check_expression(h.where)] if h.where else []  # parenthesised, as DuckDB prints it
        if h.source_lang:
            lang = quote(self.lang_column) if self.lang_column else f"{quote(self.language_head())}.language"
            parts.append(f"{lang} = '{h.source_lang}'")
        if h.input:
            parts.append(f"{quote(h.input)}.text IS NOT NULL")
        return " AND ".join(parts) or None

    def levels(self) -> list[tuple[HeadConfig, ...]]:
        """Heads in dependency order: each level only reads heads of earlier levels (Kahn's algorithm)."""
        pending = {h.name: set(self.upstream(h)) for h in self.heads}
        levels = []
        while pending:
            ready = [h for h in self.heads if h.name in pending and not pending[h.name]]
            if not ready:
                raise ConfigError("heads: dependency cycle: " + _cycle(pending))
            levels.append(tuple(ready))
            for h in ready:
                del pending[h.name]
            for deps in pending.values():
                deps.difference_update(h.name for h in ready)
        return levels

    def with_overrides(self, corpus: str | None = None, database: str | None = None) -> "PipelineConfig":
        if database and database.startswith("ducklake:"):  # --db: a lake's SQLite catalog from the working directory
            database = _resolve_database(database, Path.cwd())
        return self.model_copy(update={"corpus": corpus or self.corpus, "database": database or self.database})


def _strip_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def where_references(where: str | None, names) -> list[str]:
    """Head names used as `name.field` in a predicate (outside string literals)."""
    if not where:
        return []
    code = _strip_literals(where)
    return [n for n in names if re.search(r'(?<![\w."])"?' + re.escape(n) + r'"?\s*\.\s*[A-Za-z_"]', code)]


def _cycle(pending: dict[str, set[str]]) -> str:
    """One cycle among the heads left unordered, written a -> b -> a."""
    node = next(iter(pending))
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = sorted(pending[node])[0]
    loop = path[path.index(node):] + [node]
    return " -> ".join(loop) + " (each needs the next one's results first)"


# --- the declaration, per task and for the file ------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _head_model(task: str, target: str) -> type[HeadKeys]:
    cls = head_class(task)
    doc = HeadKeys.model_fields["model"].description
    model = (str, Field(description=doc)) if cls.model_class is not None else \
        (str, Field(cls.default_model, description=doc))
    return create_model(f"{task}_head", __base__=(cls.Params, HeadKeys), __doc__=(cls.__doc__ or "").strip() or None,
                        task=(Literal[task], Field(description=f"{task}: {(head_doc(cls))}")), model=model)


def head_model(task: str) -> type[HeadKeys]:
    """A `[heads.NAME]` table of this task: the keys every head accepts and the head's own."""
    return _head_model(task, HEADS[task])


def head_doc(cls) -> str:
    """The first line of a head module's docstring: what the head does."""
    import inspect

    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    return doc.splitlines()[0].rstrip(".") if doc else cls.__name__


HeadName = Annotated[str, Field(pattern="^" + HEAD_NAME.pattern.removesuffix(r"\Z") + "$")]


def config_model() -> type[Keys]:
    """A whole config file: the pipeline's keys and `heads`, each a table discriminated on `task`."""
    members = tuple(head_model(task) for task in HEADS)
    head = Annotated[Union[members], Field(discriminator="task")] if len(members) > 1 else members[0]
    return create_model("taskheads_pipeline", __base__=PipelineKeys, __doc__="A taskheads pipeline (pipeline.toml).",
                        heads=(Annotated[dict[HeadName, head], Field(min_length=1)],
                               Field(description="the heads, one table [heads.NAME] each (NAME: [A-Za-z_][A-Za-z0-9_]*)")))


def json_schema() -> dict:
    """The JSON Schema of a config file (for editors completing TOML, e.g. with taplo or Even Better TOML)."""
    schema = config_model().model_json_schema()
    schema["properties"]["heads"]["additionalProperties"] = False  # a head name outside the pattern
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --- parsing ----------------------------------------------------------------------------------------
def _resolve_path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p))


def _resolve_database(value: str, base: Path) -> str:
    """A DuckDB file's path, or a DuckLake (`ducklake:sqlite:FILE` with FILE resolved, `ducklake:postgres:...`)."""
    from storage.lake import LakeError, is_lake, parse, resolve

    if not is_lake(value):
        return _resolve_path(value, base)
    try:
        parse(value)
    except LakeError as exc:
        raise ConfigError(f"database: {exc}") from None
    return resolve(value, base)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1


def parse_head(name: str, raw: Any, base: Path) -> HeadConfig:
    key = f"heads.{name}"
    if not HEAD_NAME.match(name):
        raise ConfigError(f"{key}: head names must match [A-Za-z_][A-Za-z0-9_]* (they name files, "
                          f"SQL columns and Prefect tasks), got {name!r}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table like [heads.{name}] with task and model")
    task = raw.get("task")
    if task is None:
        raise ConfigError(f"{key}.task: missing (one of {', '.join(sorted(HEADS))})")
    if not isinstance(task, str) or task not in HEADS:
        raise ConfigError(f"{key}.task: unknown task {task!r} (known: {', '.join(sorted(HEADS))})")
    cls = head_class(task)
    table = head_model(task)
    try:
        keys = table.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, table, prefix=f"{key}.", raw=raw, owner=f" for a {task} head") from None
    model = keys.model
    local = _resolve_path(model, base)
    if cls.model_class is not None and (Path(local).exists() or _looks_like_path(model)):
        model = local
        folder = Path(model)
        if not folder.is_dir():
            raise ConfigError(f"{key}.model: model folder not found: {model}")
        if not any(folder.glob("*.safetensors")):
            raise ConfigError(f"{key}.model: no *.safetensors weights in {model} (taskheads loads safetensors only)")
        if not (folder / "config.json").exists():
            raise ConfigError(f"{key}.model: no config.json in {model}")
    if keys.where is not None:
        try:
            check_expression(keys.where)
        except UnsafeSQL as exc:
            raise ConfigError(f"{key}.where: invalid predicate {keys.where!r}: {exc}") from None
    problem = check_backend(task, keys.backend, keys.dtype)  # which backend serves which task, installed or not
    if problem:
        raise ConfigError(f"{key}.backend: {problem}")
    common = {k: getattr(keys, k) for k in HeadKeys.model_fields}
    params = {k: getattr(keys, k) for k in cls.Params.model_fields if k in keys.model_fields_set}
    return HeadConfig(**{**common, "model": model}, name=name, params=params)


def parse_config(raw: Mapping[str, Any], base: Path, source: str | None = None) -> PipelineConfig:
    top = {k: v for k, v in raw.items() if k != "heads"}
    try:
        keys = PipelineKeys.model_validate(top)
    except ValidationError as exc:
        raise config_error(exc, PipelineKeys, raw=top, allowed=["heads"]) from None
    heads_raw = raw.get("heads")
    if not heads_raw or not isinstance(heads_raw, dict):
        raise ConfigError("heads: no heads configured (add a [heads.NAME] table with task and model)")
    heads = tuple(parse_head(name, h, base) for name, h in heads_raw.items())
    paths = {"corpus": _resolve_path(keys.corpus, base), "database": _resolve_database(keys.database, base),
             "staging": _resolve_path(keys.staging, base) if keys.staging else None,
             "data_path": _resolve_path(keys.data_path, base) if keys.data_path and "://" not in keys.data_path
             else keys.data_path}
    if paths["database"].startswith("ducklake:postgres:"):
        for key in ("data_path", "staging"):
            if not paths[key]:
                raise ConfigError(f"{key}: a DuckLake with a PostgreSQL catalog needs {key} (a folder every "
                                  "machine that runs units reaches: " + ("its Parquet data files)" if key == "data_path"
                                                                         else "load packages)"))
    cfg = PipelineConfig(**{**dict(keys), **paths}, heads=heads, source=source)
    _check_dependencies(cfg)
    return cfg


def _check_dependencies(cfg: PipelineConfig) -> None:
    names = {h.name for h in cfg.heads}
    tasks = {h.name: h.task for h in cfg.heads}
    languages = [h.name for h in cfg.heads if h.task == "language"]
    for h in cfg.heads:
        key = f"heads.{h.name}"
        for ref in where_references(h.where, [o for o in names if o != h.name]):
            if cfg.head(ref).result_table.upstream is None:  # e.g. embeddings: vectors, nothing to route on
                raise ConfigError(f"{key}.where: head {ref!r} is an {tasks[ref]} head; it exposes no fields "
                                  f"to route on (depends_on orders heads without reading them)")
        for d in h.depends_on:
            if d not in names or d == h.name:
                raise ConfigError(f"{key}.depends_on: {d!r} is not another head (heads: {', '.join(sorted(names))})")
        if h.input is not None:
            if h.input not in names or h.input == h.name:
                raise ConfigError(f"{key}.input: {h.input!r} is not another head")
            if tasks[h.input] != "translation":
                raise ConfigError(f"{key}.input: {h.input!r} is a {tasks[h.input]} head; input must name a "
                                  "translation head (its output text replaces the text column)")
        if h.source_lang and not cfg.lang_column:
            if h.task == "language":
                raise ConfigError(f"{key}.source_lang: a language head cannot route by its own output")
            if len(languages) != 1:
                raise ConfigError(f"{key}.source_lang: needs lang_column, or exactly one head with "
                                  f"task = 'language' (found {len(languages)})")
    cfg.levels()  # refuses cycles with the loop spelled out


def read_toml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def load_config(path: str | os.PathLike) -> PipelineConfig:
    p = Path(path)
    return parse_config(read_toml(p), p.resolve().parent, source=str(p.resolve()))
