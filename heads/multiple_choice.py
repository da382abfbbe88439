"""Multiple choice: score candidate options for a document with `AutoModelForMultipleChoice`.

Per document the options are the config `choices` followed by those of `choices_column` (a list of
strings or one string; nulls and blanks ignored; stripped; repeats dropped, first occurrence kept).
A document with fewer than 2 options fails (`TooFewChoicesError`, at the encode stage).

The first segment is the document text, or `prompt` with "{text}" replaced by it (plain
`str.replace`, so braces in the template or the text are harmless). Each (first segment, option)
pair is ONE feature, tokenized as the HF multiple-choice examples do
(`tokenizer(first, option, truncation="only_first", max_length=window)`), so the engine can batch
the pairs of many documents by length.

A multiple-choice model scores every choice separately (the encoder runs over
[batch * num_choices, seq], a linear layer gives one logit per choice, the result is only reshaped
to [batch, num_choices]), so `forward` feeds [n_features, 1, seq] and gets one logit per pair:
the same logits as the native [1, num_choices, seq] layout of one document. `decode` soft-maxes a
document's logits over its options.

Rows, one per option, in option order: choice, score (softmax probability), logit, rank (1 = best;
ties keep option order) and truncated (the first segment (the text, or the filled prompt) was cut
so the pair fits the model window: long documents are never cut silently).
"""
from __future__ import annotations

from typing import Annotated, Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator
from transformers import AutoModelForMultipleChoice

from core.config import Expect, ParamError

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable, softmax, strings_from_column, unique

CHOICES = ResultTable(
    "choices",
    (pa.field("choice", pa.string()), pa.field("score", pa.float64()), pa.field("logit", pa.float64()),
     pa.field("rank", pa.int32()), pa.field("truncated", pa.bool_())),
    upstream="'choice': arg_max(r.choice, r.score), 'score': max(r.score)",
    doc="one row per (document, option): softmax score over the document's options and rank (1 = best)")


class MultipleChoiceParams(HeadParams):
    choices: Annotated[list[Annotated[str, Field(pattern=r"\S")]] | None,
                       Expect("a list of non-empty strings")] = []
    """options offered for every document"""
    choices_column: Annotated[str, Field(pattern=r"\S")] | None = None
    """corpus column with per-document options (a list or a string column)"""
    prompt: Annotated[str, Expect("a string containing {text}")] = ""
    """template with {text}: the first segment of each pair (default: the text itself)"""

    @model_validator(mode="after")
    def _rules(self):
        choices = self.choices or []
        if self.prompt and "{text}" not in self.prompt:
            raise ParamError("prompt", f"prompt must contain the placeholder {{text}}, got {self.prompt!r}")
        if not choices and not self.choices_column:
            raise ValueError("the multiple_choice head needs options: set `choices` and/or `choices_column`")
        if not self.choices_column and len(unique([c.strip() for c in choices])) < 2:
            raise ParamError("choices", f"choices needs at least 2 distinct options when no choices_column is set, "
                                        f"got {list(choices)!r}")
        return self


class TooFewChoicesError(DocumentError, ValueError):
    """A document with fewer than 2 distinct options: there is nothing to choose between."""


class ChoiceTooLongError(DocumentError, ValueError):
    """An option that leaves no room for the document text in a model window."""


class MultipleChoiceHead(Head):
    task = "multiple_choice"
    table = "choices"
    tables = (CHOICES,)
    model_class = AutoModelForMultipleChoice
    Params = MultipleChoiceParams

    def setup(self) -> None:
        self.choices = unique([c.strip() for c in (self.p["choices"] or [])])
        self.choices_column = self.p["choices_column"]
        self.prompt = self.p["prompt"]
        self.window = self.max_length()
        self.n_special = self.tokenizer.num_special_tokens_to_add(pair=True)
        if self.window - self.n_special < 2:
            raise ValueError(f"the model window of {self.window} tokens leaves no room for a text and an option")
        for c in self.choices:  # a config option too long for the window would fail every document
            self._check_choice(c)

    @classmethod
    def columns_for(cls, p) -> list[str]:
        return [p["choices_column"]] if p.get("choices_column") else []

    def choices_for(self, doc: Doc) -> list[str]:
        """The config options, then those of the choices column; stripped, blanks and repeats dropped."""
        choices = list(self.choices)
        column = self.choices_column
        if column:
            if column not in doc.fields:
                raise DocumentError(f"choices column {column!r} is missing from the document's fields")
            choices.extend(strings_from_column(doc.fields[column], column, "choices"))
        choices = unique(choices)
        if len(choices) < 2:
            raise TooFewChoicesError(
                f"fewer than 2 choices for this document ({len(choices)}: {choices!r}); "
                f"config choices {self.choices!r}" + (f" plus column {column!r}" if column else ""))
        return choices

    def first_segment(self, doc: Doc) -> str:
        return self.prompt.replace("{text}", doc.text) if self.prompt else doc.text

    # --- the contract -------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        choices = self.choices_for(doc)
        first = self.first_segment(doc)
        if not first.strip():
            raise DocumentError("empty text: there is nothing to choose an option for")
        for c in choices[len(self.choices):] if self.choices_column else []:
            self._check_choice(c)  # config options were checked once in setup
        try:
            n_first = len(self.tokenizer(first, add_special_tokens=False)["input_ids"])
            enc = self.tokenizer([first] * len(choices), choices, truncation="only_first",
                                 max_length=self.window)
        except BaseException as exc:
            # the Rust tokenizer reports truncation problems with a panic (a BaseException)
            if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
                raise DocumentError(f"tokenizer failed: {str(exc).strip()[:200]}") from exc
            raise
        if n_first == 0:
            raise DocumentError("the text has no tokens (only spaces or characters the tokenizer drops)")
        types = enc.get("token_type_ids")
        feats = []
        for k, choice in enumerate(choices):
            kept = sum(1 for s in enc.sequence_ids(k) if s == 0)
            feats.append(Feature(0, list(enc["input_ids"][k]), list(types[k]) if types is not None else None,
                                 {"choice_index": k, "choice": choice, "truncated": kept < n_first}))
        return feats

    def forward(self, feats: Sequence[Feature]) -> list[float]:
        batch = self.collate(feats)
        # [n, seq] -> [n, 1, seq]: each pair is its own one-choice question
        batch = {k: v.unsqueeze(1) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(x) for x in logits.float().reshape(-1).cpu().numpy()]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[Any]) -> list[dict]:
        choices = self.choices_for(doc)
        by_index: dict[int, tuple[Feature, float]] = {}
        for f, o in zip(feats, outs):
            by_index[f.meta["choice_index"]] = (f, o)
        if sorted(by_index) != list(range(len(choices))) or len(feats) != len(choices):
            raise ValueError(f"expected one model output per choice ({len(choices)}), got {len(feats)}")
        for k, choice in enumerate(choices):
            if by_index[k][0].meta["choice"] != choice:
                raise ValueError(f"choice {k} changed between encode and decode")
        return decode_choices(choices, [by_index[k][1] for k in range(len(choices))],
                              [bool(by_index[k][0].meta["truncated"]) for k in range(len(choices))])

    # --- helpers ------------------------------------------------------------------------
    def _check_choice(self, choice: str) -> None:
        n = len(self.tokenizer(choice, add_special_tokens=False)["input_ids"])
        if n + self.n_special >= self.window:
            raise ChoiceTooLongError(f"choice of {n} tokens leaves no room for the text in a window of "
                                     f"{self.window} tokens: {choice[:80]!r}")


# --- pure decoding ------------------------------------------------------------------------
def decode_choices(choices: Sequence[str], logits: Sequence[float], truncated: Sequence[bool]) -> list[dict]:
    """One row per option: softmax probability over the options, logit, rank (1 = best, ties in order)."""
    if not (len(choices) == len(logits) == len(truncated)) or not choices:
        raise ValueError("decode_choices needs the same, non-zero number of choices, logits and flags")
    x = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"non-finite choice logits: {x.tolist()}")
    probs = softmax(x)
    order = np.argsort(-x, kind="stable")
    rank = np.empty(len(x), dtype=np.int64)
    rank[order] = np.arange(1, len(x) + 1)
    return [{"choice": c, "score": float(probs[k]), "logit": float(x[k]), "rank": int(rank[k]),
             "truncated": bool(truncated[k])} for k, c in enumerate(choices)]
