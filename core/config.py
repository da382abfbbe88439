"""The typed declaration of a config file: every key once, with its type, default and one-line doc.

- `PipelineKeys`: the top-level keys; `HeadKeys`: the keys every head accepts, whatever its task;
  `HeadParams`: the base of a head's own keys (each head module declares `class Params(HeadParams)`
  next to its code, e.g. heads/classification.py).
- Pydantic v2, strict: a bool is not an integer, a float is not an integer, a string is not a list;
  unknown keys are refused. The docstring under a key is its documentation (JSON Schema, docs).
- `explain` turns a validation error into ONE line naming the key, e.g.
  `heads.topic.stride: expected an integer >= 0, got bool True`.

pipeline.config puts them together per task (a discriminated union on `task`) to validate a config
file and to print its JSON Schema (`taskheads schema`). Leaf module: imports nothing of the project.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError,
                      WithJsonSchema, field_validator)

from .errors import ConfigError

DEFAULT_BATCH_TOKENS = 4096  # padded tokens per batch; 2k-4k is fastest on CPU (see benchmarks/README.md)


class Keys(BaseModel):
    """A table of config keys: strict types, unknown keys refused, the docstring under a key documents it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)


@dataclass(frozen=True)
class Expect:
    """What a key holds, in words for error messages, where its type alone does not say it
    (`Annotated[str, Expect("a two-letter ISO 639-1 code")]`)."""

    text: str


class Unexpected(ValueError):
    """Raised by a validator when a value is not what the key expects: the message says what it expects."""


class ParamError(ValueError):
    """Raised by a cross-key validator: the message is about `key` (e.g. doc_stride against max_seq_len)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def Number(ge: float | None = None, gt: float | None = None, le: float | None = None):  # noqa: N802 (a type)
    """A finite number with bounds. An integer stays an integer (1 is not turned into 1.0): the values of
    a head's params are hashed into its model id, which must not change for an unchanged config."""
    bounds = {k: v for k, v in (("minimum", ge), ("exclusiveMinimum", gt), ("maximum", le)) if v is not None}

    def check(v):
        if not math.isfinite(v) or (ge is not None and v < ge) or (gt is not None and v <= gt) or (
                le is not None and v > le):
            raise Unexpected("out of range")
        return v

    return Annotated[Union[StrictInt, StrictFloat], AfterValidator(check), WithJsonSchema({"type": "number", **bounds})]


class HeadParams(Keys):
    """The base of a head's own keys (`params`): what they are is part of the head's model id."""

    added_later: ClassVar[tuple[str, ...]] = ()
    """keys added after model ids were in use, whose default reproduces what the head did before:
    left out of the model id while at their default, so adding one re-infers nothing"""


class HeadKeys(Keys):
    """The keys every head accepts, whatever its task."""

    task: str
    """the head's task: one of the registered heads (classification, ner, qa, ...)"""
    model: str | None = None
    """local model folder or hub id (a model-free head: the detector it runs)"""
    revision: str | None = None
    """hub revision (branch, tag or commit) passed to from_pretrained"""
    where: str | None = None
    """one SQL expression over corpus columns and upstream heads' results (topic.label) routing documents here"""
    depends_on: Annotated[tuple[str, ...], Field(strict=False), Expect("a list of head names")] = ()
    """heads that must run first (heads named in `where` or `input` are added by themselves)"""
    input: str | None = None
    """an upstream translation head whose output this head reads instead of the text column"""
    source_lang: Annotated[str, Field(pattern=r"^[a-z]{2}$"),
                           Expect("a two-letter ISO 639-1 code such as 'de'")] | None = None
    """ISO 639-1 code: only documents in this language (lang_column, or a language head)"""
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    """float32 | bfloat16 | float16 (CUDA) | int8 (dynamic quantization of Linear layers, CPU)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (auto picks CUDA when present)"""
    batch_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] = DEFAULT_BATCH_TOKENS
    """padded-token budget per batch, or "auto" (4096 on CPU, 1024 for the onnxruntime backend there; sized to
    the GPU's free memory on CUDA)"""
    backend: Literal["torch", "onnxruntime", "ctranslate2", "auto"] = "torch"
    """torch | onnxruntime (encoder heads; extra taskheads[onnx]) | ctranslate2 (translation; extra taskheads[ct2]) | auto (the fastest installed for the task)"""
    trust_remote_code: bool = False
    """allow model code from the hub (off by default)"""
    gold_column: str | None = None
    """corpus column with the expected output: every run evaluates the head on the labelled rows"""

    @field_validator("where")
    @classmethod
    def _where_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty predicate (leave the key out to route every document)")
        return v


class PipelineKeys(Keys):
    """The top-level keys of a config file (the heads are tables under `[heads.NAME]`)."""

    corpus: str
    """file, folder or glob of Parquet files"""
    database: str
    """DuckDB file the results go to, or a DuckLake: `ducklake:sqlite:FILE` (processes on one machine) or
    `ducklake:postgres:dbname=... host=...` (many machines), which many processes read and write at once"""
    data_path: str | None = None
    """a DuckLake's folder for its Parquet data files, used when the lake is created (default beside a SQLite
    catalog: `<catalog>.files/`; required with a PostgreSQL catalog, on storage every worker reaches)"""
    staging: str | None = None
    """folder for load packages (default: beside the database); on a shared filesystem for remote workers
    (required with a PostgreSQL-catalog DuckLake)"""
    id_column: str = "id"
    """corpus column holding the document id"""
    text_column: str = "text"
    """corpus column holding the text"""
    unit_docs: Annotated[int, Field(ge=1)] = 2000
    """documents per work unit (one Prefect task per unit and head)"""
    lang_column: str | None = None
    """corpus column holding each document's language (ISO 639-1), for heads' source_lang"""
    max_resident_models: Annotated[int, Field(ge=0)] = 0
    """models kept loaded per worker process (least recently used is unloaded); 0 = no limit"""
    max_attempts: Annotated[int, Field(ge=1)] = 3
    """times a document with a transient fault (out of memory, timeout) is tried before it counts as terminal"""
    max_units_in_flight: Annotated[int, Field(ge=1)] | None = None
    """work units submitted and not yet loaded, all heads of a level together (default: 2 per worker); units
    are read from the plan as room frees up, so memory does not grow with the corpus"""
    memory_limit: Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*([KMGT]i?B)\s*$"),
                            Expect("a size such as '512MB' or '2GB'")] = "1GB"
    """DuckDB memory for planning the corpus (each document's id and fingerprint per head); beyond it
    DuckDB spills to the run's staging folder, so a corpus of any size plans in bounded memory. The planner
    scans with one thread per 96MB of it (more plans faster; below 96MB large row groups run out)"""
    load_wait: Annotated[float, Field(ge=0)] = 600.0
    """seconds a run waits, with backoff, for the database file to load its staged packages after the last
    unit (and before a level reading upstream results) while another process holds the file; a run never
    fails for it: what is left waits, staged, for `taskheads load CONFIG` or the next run. Also how long a
    run waits before giving up (exit 75) when another process holds the file read-write"""


# --- one line per problem ---------------------------------------------------------------------------
def explain(exc: ValidationError, model: type[BaseModel], prefix: str = "", raw: Mapping[str, Any] | None = None,
            owner: str = "", allowed: Sequence[str] = ()) -> str:
    """The first problem pydantic found, in one line that names the key: `<prefix><key>: ...`
    (a problem of no one key, e.g. "needs questions", is `<prefix without its dot>: ...`).

    `raw` (the table as written) gives the value shown; `owner` qualifies unknown keys ("for a qa head"),
    `allowed` names keys besides the model's that the table may hold."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    key = str(loc[0]) if loc else None
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        key = cause.key
    where = (f"{prefix}{key}" if key else prefix.rstrip(".")) + ": "
    if where == ": ":
        where = ""
    kind = err["type"]
    if kind == "missing":
        return f"{where}missing ({model.model_fields[key].description or 'required'})"
    if kind == "extra_forbidden":
        return f"{where}unknown key{owner} (allowed: {', '.join(sorted([*model.model_fields, *allowed]))})"
    if kind in ("value_error", "assertion_error") and not isinstance(cause, Unexpected):
        return f"{where}{cause if cause is not None else err['msg']}"
    value = raw[key] if raw is not None and key in raw else err["input"]
    return f"{where}expected {expected(model, key)}, got {type(value).__name__} {value!r}"


def config_error(exc: ValidationError, model: type[BaseModel], prefix: str = "", raw: Mapping[str, Any] | None = None,
                 owner: str = "", allowed: Sequence[str] = ()) -> ConfigError:
    return ConfigError(explain(exc, model, prefix, raw, owner, allowed))


def expected(model: type[BaseModel], key: str | None) -> str:
    """What `key` holds, in words: its `Expect`, or said from its JSON Schema ("an integer >= 1")."""
    if key not in model.model_fields:
        return "a valid value"
    for meta in _metadata(model.model_fields[key]):
        if isinstance(meta, Expect):
            return meta.text
    schema = model.model_json_schema()
    return _phrase(schema["properties"].get(key, {}), schema.get("$defs", {}))


def _metadata(field) -> list:
    out = list(field.metadata)
    for arg in getattr(field.annotation, "__args__", ()) or ():  # Optional[Annotated[...]]
        out += list(getattr(arg, "__metadata__", ()))
    return out


def _bounds(s: dict) -> str:
    lo, hi = s.get("minimum"), s.get("maximum")
    if lo is not None and hi is not None:
        return f" between {lo:g} and {hi:g}"
    ops = [(">=", s.get("minimum")), (">", s.get("exclusiveMinimum")), ("<=", s.get("maximum")),
           ("<", s.get("exclusiveMaximum"))]
    parts = [f"{op} {v:g}" for op, v in ops if v is not None]
    return " " + " and ".join(parts) if parts else ""


def _phrase(s: dict, defs: dict) -> str:
    if "$ref" in s:
        return _phrase(defs.get(s["$ref"].rsplit("/", 1)[-1], {}), defs)
    if "anyOf" in s:
        return " or ".join(_phrase(p, defs) for p in s["anyOf"] if p.get("type") != "null")
    if "const" in s:
        return repr(s["const"])
    if "enum" in s:
        values = [repr(v) for v in s["enum"]]
        return " or ".join(values) if len(values) <= 2 else "one of " + ", ".join(values)
    kind = s.get("type")
    if kind == "integer":
        return "an integer" + _bounds(s)
    if kind == "number":
        return "a number" + _bounds(s)
    if kind == "boolean":
        return "true or false"
    if kind == "string":
        return "a non-empty string" if s.get("minLength") else "a string"
    if kind == "array":
        item = _phrase(s.get("items", {}), defs).removeprefix("an ").removeprefix("a ")
        word, _, rest = item.partition(" ")
        if word == "non-empty":
            word, _, rest = rest.partition(" ")
            word = "non-empty " + word
        return f"a list of {word}s{' ' + rest if rest else ''}"
    if kind == "object":
        return "a table"
    return "a valid value"
