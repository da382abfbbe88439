"""The contract every head implements: encode (pure) -> forward (the model) -> decode (pure).

A head never batches by itself: the engine (`heads.engine.pipe`) collects the features of many
documents, sorts them by length, fills batches up to a token budget and hands each batch to
`forward`. `encode` and `decode` are pure functions of the document and the model outputs, so
they can be unit-tested with hand-made logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Collection, Mapping, Sequence

import numpy as np
import torch
from pydantic import ValidationError

from core.config import HeadParams, explain
from core.doc import Doc
from core.errors import DocumentError
from core.tables import ResultTable


@dataclass
class Feature:
    """One model input: a window (or segment, or question x window) of one document."""

    doc_index: int  # index of its document in the sequence given to the engine
    input_ids: list[int]
    token_type_ids: list[int] | None = None
    meta: dict = field(default_factory=dict)  # what decode needs: offsets, window index, question

    @property
    def length(self) -> int:
        return len(self.input_ids)


class Head:
    """Base class of the task heads: a head is one module declaring what it is, next to its code.

    - `task`, `model_class` (None: no transformer) and `default_model` (what `model` means when a
      model-free head leaves it out);
    - `Params`: its own config keys, typed, with defaults and a docstring each (a `HeadParams` model;
      cross-key rules as its validators). The config layer, the JSON Schema and the docs read it;
      `self.p` is the validated dict, defaults included: it is hashed into the model id;
    - `tables`: the result tables it writes (`ResultTable`: columns, and what a downstream `where`
      sees); `table` names the one it writes (`table_for` when a param chooses, e.g. a mode);
    - `encode` / `forward` / `decode`.
    A new head is that module plus one line in heads/registry.py.
    """

    task: ClassVar[str]
    table: ClassVar[str]
    tables: ClassVar[tuple[ResultTable, ...]]
    model_class: ClassVar[Any]  # e.g. transformers.AutoModelForSequenceClassification; None: no transformer
    default_model: ClassVar[str | None] = None  # what `model` means when a model-free head leaves it out
    Params: ClassVar[type[HeadParams]] = HeadParams
    params: ClassVar[Mapping[str, Any]] = {}  # the defaults of Params (set for each subclass)
    # a batch stops growing when padding passes 1 - this share of its tokens (engine.MIN_FILL for
    # encoders, whose cost is the padded tokens); generation heads lower it: their cost is the decoding
    # steps, per batch, so bigger batches pay them fewer times
    batch_min_fill: ClassVar[float] = 0.95

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = {k: f.get_default(call_default_factory=True) for k, f in cls.Params.model_fields.items()}

    def __init__(self, name: str, model: Any, tokenizer: Any, params: Mapping[str, Any] | None = None):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.p = self.validate_params(params or {}, prefix=f"heads.{name}.")
        self.setup()

    @classmethod
    def validate_params(cls, p: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """The params with their defaults, checked against `Params` before any model is loaded; a
        ValueError in one line that starts with the key (`stride: expected an integer >= 0, ...`)."""
        try:
            return cls.Params.model_validate(dict(p)).model_dump()
        except ValidationError as exc:
            raise ValueError(explain(exc, cls.Params, prefix=prefix, raw=p)) from None

    @classmethod
    def table_for(cls, p: Mapping[str, Any]) -> str:
        """The result table a head with these parameters writes (heads with modes override this)."""
        return cls.table

    @property
    def result_table(self) -> ResultTable:
        """The declaration of the table this head writes."""
        return next(t for t in self.tables if t.name == self.table)

    def setup(self) -> None:
        """Derive per-model constants (window size, label map); called once after loading."""

    @classmethod
    def params_from_files(cls, name: str, p: Mapping[str, Any], folder: Any) -> dict:
        """`p` as `setup` leaves it, from the model folder's files alone (heads.identity hashes it into the
        model id without loading the model). A head whose `setup` changes `self.p` overrides both alike."""
        return dict(p)

    @classmethod
    def columns_for(cls, p: Mapping[str, Any]) -> list[str]:
        """Corpus columns besides id and text the head reads with these params (no model needed)."""
        return []

    def needed_columns(self) -> list[str]:
        """Corpus columns besides id and text that `encode` reads from `doc.fields`."""
        return self.columns_for(self.p)

    # --- the contract -------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        raise NotImplementedError

    def forward(self, feats: Sequence[Feature]) -> list[Any]:
        raise NotImplementedError

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[Any]) -> list[dict]:
        raise NotImplementedError

    # --- helpers shared by heads --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def max_length(self) -> int:
        """The longest input the model accepts: the smaller of tokenizer and position limits."""
        return model_max_length(self.model, self.tokenizer)

    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        if pid is None:
            pid = getattr(self.model.config, "pad_token_id", None)
        return 0 if pid is None else int(pid)

    def collate(self, feats: Sequence[Feature], left: bool = False) -> dict[str, torch.Tensor]:
        """Pad features into model tensors (right padding unless `left`)."""
        return collate(feats, self.pad_id(), self.device, left=left)

    def run_encoder(self, feats: Sequence[Feature]):
        """One forward pass of an encoder model over a padded batch."""
        with torch.inference_mode():
            return self.model(**self.collate(feats))


def model_max_length(model: Any, tokenizer: Any) -> int:
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    cfg = getattr(model, "config", None)
    pos = getattr(cfg, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        # RoBERTa-style models reserve padding_idx + 1 positions
        offset = 2 if getattr(cfg, "model_type", "") in {"roberta", "xlm-roberta", "camembert"} else 0
        limits.append(pos - offset)
    return min(limits) if limits else 512


def collate(feats: Sequence[Feature], pad_id: int, device: Any = "cpu", left: bool = False) -> dict[str, torch.Tensor]:
    n = max(f.length for f in feats)
    ids = np.full((len(feats), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(feats), n), dtype=np.int64)
    has_types = feats[0].token_type_ids is not None
    types = np.zeros((len(feats), n), dtype=np.int64) if has_types else None
    for i, f in enumerate(feats):
        sl = slice(n - f.length, n) if left else slice(0, f.length)
        ids[i, sl] = f.input_ids
        mask[i, sl] = 1
        if has_types:
            types[i, sl] = f.token_type_ids
    batch = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
    if has_types:
        batch["token_type_ids"] = torch.from_numpy(types).to(device)
    return batch


def unique(items: Sequence[str]) -> list[str]:
    """Items without repeats, first occurrence kept (order matters: it is the user's order)."""
    return list(dict.fromkeys(items))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def strings_from_column(value: Any, column: str, what: str) -> list[str]:
    """Strings from a corpus cell that holds one string or a list of them; nulls and blanks dropped.

    Used for per-document questions and options; anything else fails the document with a reason.
    """
    if _is_null(value):
        return []
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise DocumentError(f"{what} column {column!r} holds {type(value).__name__}; "
                            "expected a string or a list of strings")
    else:
        values = list(value)
    out = []
    for v in values:
        if _is_null(v):
            continue
        if not isinstance(v, str):
            raise DocumentError(f"{what} column {column!r} holds a {type(v).__name__} item; expected strings")
        if v.strip():
            out.append(v.strip())
    return out


def trim_generated(row: Sequence[int], eos_ids: Collection[int], prompt_len: int = 1) -> list[int]:
    """The new tokens of one row of `generate()` output: the prompt (decoder start token, or the
    padded prompt of a decoder-only model) dropped and everything after the first end-of-sequence
    token (the padding of finished rows) cut; the eos itself is kept. Pad ids are not stripped:
    T5 uses pad as decoder start and a model may generate it mid-output."""
    ids = [int(t) for t in row[prompt_len:]]
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k + 1]
    return ids


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
