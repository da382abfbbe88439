"""The one config system: a TOML file parsed into frozen, validated objects before any work.

Every problem is reported as a `ConfigError` whose message names the key, so a typo fails in one
line before a model is loaded or a document is read.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from storage.sandbox import UnsafeSQL, check_expression
from storage.schema import HEAD_NAME, UPSTREAM_FIELDS, quote

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """The configuration cannot run; the message names the offending key."""


TOP_KEYS = {
    "corpus": "file, folder or glob of Parquet files",
    "database": "DuckDB file the results go to",
    "staging": "folder for load packages (default: beside the database); on a shared filesystem for remote workers",
    "id_column": "corpus column holding the document id (default 'id')",
    "text_column": "corpus column holding the text (default 'text')",
    "unit_docs": "documents per work unit (one Prefect task per unit and head)",
    "lang_column": "corpus column holding each document's language (ISO 639-1), for heads' source_lang",
    "max_resident_models": "models kept loaded per worker process (least recently used is unloaded); 0 = no limit",
    "max_attempts": "times a document with a transient fault (out of memory, timeout) is tried before it counts as "
                    "terminal (default 3)",
    "heads": "table of heads",
}
HEAD_KEYS = {
    "task": "classification | ner | qa | translation | language | masked_lm | causal_lm | multiple_choice | embedding",
    "model": "local model folder or hub id",
    "revision": "hub revision (branch, tag or commit) passed to from_pretrained",
    "where": "one SQL expression over corpus columns and upstream heads' results (topic.label) routing documents here",
    "depends_on": "heads that must run first (heads named in `where` or `input` are added by themselves)",
    "input": "an upstream translation head whose output this head reads instead of the text column",
    "source_lang": "ISO 639-1 code: only documents in this language (lang_column, or a language head)",
    "dtype": "float32 | bfloat16 | float16 (CUDA) | int8 (dynamic quantization of Linear layers, CPU)",
    "device": "auto | cpu | cuda | cuda:N",
    "batch_tokens": "padded-token budget per batch, or \"auto\" (4096 on CPU, sized to the GPU's memory on CUDA)",
    "backend": "torch (default) | onnxruntime (encoder heads; extra taskheads[onnx]) | ctranslate2 (translation; "
               "extra taskheads[ct2]) | auto (the fastest installed for the task)",
    "trust_remote_code": "allow model code from the hub (off by default)",
    "gold_column": "corpus column with the expected output: every run evaluates the head on the labelled rows",
}


@dataclass(frozen=True)
class HeadConfig:
    name: str
    task: str
    model: str
    revision: str | None = None
    where: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_tokens: int | str = 4096  # or "auto": heads.engine.auto_token_budget
    trust_remote_code: bool = False
    gold_column: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()  # as written; PipelineConfig.upstream() adds the implied ones
    input: str | None = None
    source_lang: str | None = None
    backend: str = "torch"  # heads/backends: torch | onnxruntime | ctranslate2 | auto

    @property
    def is_local(self) -> bool:
        return Path(self.model).exists()

    @property
    def table(self) -> str:
        """The result table this head writes (known without loading the model)."""
        from heads.registry import head_class

        return head_class(self.task).table_for(dict(self.params))


@dataclass(frozen=True)
class PipelineConfig:
    corpus: str
    database: str
    heads: tuple[HeadConfig, ...]
    id_column: str = "id"
    text_column: str = "text"
    unit_docs: int = 2000
    source: str | None = None  # the config file, for lineage
    lang_column: str | None = None
    max_resident_models: int = 0
    staging: str | None = None
    max_attempts: int = 3

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
        return replace(self, corpus=corpus or self.corpus, database=database or self.database)


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


def _check_type(key: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{key}: expected {what}, got {type(value).__name__} {value!r}")


def _resolve_path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p))


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1


def parse_head(name: str, raw: Any, base: Path) -> HeadConfig:
    from heads.registry import HEADS, head_class

    key = f"heads.{name}"
    if not HEAD_NAME.match(name):
        raise ConfigError(f"{key}: head names must match [A-Za-z_][A-Za-z0-9_]* (they name files, "
                          f"SQL columns and Prefect tasks), got {name!r}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table like [heads.{name}] with task and model")
    task = raw.get("task")
    if task is None:
        raise ConfigError(f"{key}.task: missing (one of {', '.join(sorted(HEADS))})")
    if task not in HEADS:
        raise ConfigError(f"{key}.task: unknown task {task!r} (known: {', '.join(sorted(HEADS))})")
    cls = head_class(task)
    allowed = set(HEAD_KEYS) | set(cls.params)
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key for a {task} head (allowed: {', '.join(sorted(allowed))})")
    if cls.model_class is None:  # model-free head: `model` names its detector, nothing to load from disk
        model = raw.get("model", cls.default_model)
        _check_type(f"{key}.model", model, (str,), "a string")
    elif "model" not in raw:
        raise ConfigError(f"{key}.model: missing (a local model folder or a hub id)")
    else:
        _check_type(f"{key}.model", raw["model"], (str,), "a string")
        model = raw["model"]
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
    for k, types, what in (("revision", (str,), "a string"), ("where", (str,), "an SQL predicate string"),
                           ("gold_column", (str,), "a column name"), ("input", (str,), "a head name"),
                           ("source_lang", (str,), "an ISO 639-1 code such as 'de'"),
                           ("depends_on", (list,), "a list of head names"),
                           ("dtype", (str,), "a string"), ("device", (str,), "a string"),
                           ("batch_tokens", (int, str), "an integer or \"auto\""),
                           ("backend", (str,), "a string"), ("trust_remote_code", (bool,), "true or false")):
        if k in raw:
            _check_type(f"{key}.{k}", raw[k], types, what)
    if raw.get("dtype", "float32") not in ("float32", "bfloat16", "float16", "int8"):
        raise ConfigError(f"{key}.dtype: must be 'float32', 'bfloat16', 'float16' or 'int8', not {raw['dtype']!r}")
    if isinstance(raw.get("batch_tokens"), str) and raw["batch_tokens"] != "auto":
        raise ConfigError(f"{key}.batch_tokens: must be an integer or \"auto\", not {raw['batch_tokens']!r}")
    if isinstance(raw.get("batch_tokens"), int) and raw["batch_tokens"] < 16:
        raise ConfigError(f"{key}.batch_tokens: must be at least 16")
    from heads.backends import check_backend

    problem = check_backend(task, raw.get("backend", "torch"), raw.get("dtype", "float32"))
    if problem:
        raise ConfigError(f"{key}.backend: {problem}")
    if "where" in raw and not raw["where"].strip():
        raise ConfigError(f"{key}.where: empty predicate (leave the key out to route every document)")
    if "where" in raw:
        try:
            check_expression(raw["where"])
        except UnsafeSQL as exc:
            raise ConfigError(f"{key}.where: invalid predicate {raw['where']!r}: {exc}") from None
    if any(not isinstance(d, str) for d in raw.get("depends_on", [])):
        raise ConfigError(f"{key}.depends_on: expected a list of head names, got {raw['depends_on']!r}")
    if "source_lang" in raw and not re.fullmatch(r"[a-z]{2}", raw["source_lang"]):
        raise ConfigError(f"{key}.source_lang: expected a two-letter ISO 639-1 code such as 'de', "
                          f"got {raw['source_lang']!r}")
    params = {k: v for k, v in raw.items() if k in cls.params}
    for k, v in params.items():
        default = cls.params[k]
        if default is not None and not isinstance(v, type(default)) and not (
                isinstance(default, float) and isinstance(v, int)):
            raise ConfigError(f"{key}.{k}: expected {type(default).__name__}, got {type(v).__name__} {v!r}")
    try:  # let the head check its own parameter values without a model
        cls.validate_params({**cls.params, **params})
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return HeadConfig(name=name, task=task, model=model, revision=raw.get("revision"), where=raw.get("where"),
                      dtype=raw.get("dtype", "float32"), device=raw.get("device", "auto"),
                      batch_tokens=raw.get("batch_tokens", 4096),
                      trust_remote_code=raw.get("trust_remote_code", False), gold_column=raw.get("gold_column"),
                      params=params, depends_on=tuple(raw.get("depends_on", ())), input=raw.get("input"),
                      source_lang=raw.get("source_lang"), backend=raw.get("backend", "torch"))


def parse_config(raw: Mapping[str, Any], base: Path, source: str | None = None) -> PipelineConfig:
    for k in raw:
        if k not in TOP_KEYS:
            raise ConfigError(f"{k}: unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    for k in ("corpus", "database"):
        if k not in raw:
            raise ConfigError(f"{k}: missing ({TOP_KEYS[k]})")
        _check_type(k, raw[k], (str,), "a string")
    for k in ("id_column", "text_column"):
        if k in raw:
            _check_type(k, raw[k], (str,), "a column name")
    unit_docs = raw.get("unit_docs", 2000)
    _check_type("unit_docs", unit_docs, (int,), "an integer")
    if unit_docs < 1:
        raise ConfigError("unit_docs: must be at least 1")
    heads_raw = raw.get("heads")
    if not heads_raw or not isinstance(heads_raw, dict):
        raise ConfigError("heads: no heads configured (add a [heads.NAME] table with task and model)")
    if "lang_column" in raw:
        _check_type("lang_column", raw["lang_column"], (str,), "a column name")
    if "staging" in raw:
        _check_type("staging", raw["staging"], (str,), "a folder path")
    max_models = raw.get("max_resident_models", 0)
    _check_type("max_resident_models", max_models, (int,), "an integer")
    if max_models < 0:
        raise ConfigError("max_resident_models: must be 0 (no limit) or more")
    max_attempts = raw.get("max_attempts", 3)
    _check_type("max_attempts", max_attempts, (int,), "an integer")
    if max_attempts < 1:
        raise ConfigError("max_attempts: must be at least 1")
    heads = tuple(parse_head(name, h, base) for name, h in heads_raw.items())
    cfg = PipelineConfig(corpus=_resolve_path(raw["corpus"], base), database=_resolve_path(raw["database"], base),
                         heads=heads, id_column=raw.get("id_column", "id"),
                         text_column=raw.get("text_column", "text"), unit_docs=unit_docs, source=source,
                         lang_column=raw.get("lang_column"), max_resident_models=max_models,
                         max_attempts=max_attempts,
                         staging=_resolve_path(raw["staging"], base) if raw.get("staging") else None)
    _check_dependencies(cfg)
    return cfg


def _check_dependencies(cfg: PipelineConfig) -> None:
    names = {h.name for h in cfg.heads}
    tasks = {h.name: h.task for h in cfg.heads}
    languages = [h.name for h in cfg.heads if h.task == "language"]
    for h in cfg.heads:
        key = f"heads.{h.name}"
        for ref in where_references(h.where, [o for o in names if o != h.name]):
            if cfg.head(ref).table not in UPSTREAM_FIELDS:  # e.g. embeddings: vectors, nothing to route on
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


def load_config(path: str | os.PathLike) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(raw, p.resolve().parent, source=str(p.resolve()))
