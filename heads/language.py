"""Language identification with lingua: model-free (lingua ships its own n-gram models), one row per document.

Only the first `max_chars` characters of a document are looked at (language is settled long before
2000 characters, and lingua's cost grows with the text); the row's `n_chars` records how many were
used, so a cut is never silent. `confidence` is lingua's probability of the best language among the
configured ones; `language` is NULL when that is below `min_confidence` or tied with the runner-up (the
confidence is still reported), and for a text without letters (confidence 0.0).
"""
from __future__ import annotations

from importlib.metadata import version
from typing import Annotated, Any, Sequence

import pyarrow as pa
import torch
from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
from pydantic import Field, field_validator

from core.config import Expect, Number

from .base import Doc, Feature, Head, HeadParams, ResultTable, unique

CHARS_PER_TOKEN = 4  # the engine budgets tokens; a character costs lingua about a quarter of a token
LINGUA_CODES = frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())


class TextFeature(Feature):
    """A feature carrying text (`meta["text"]`) instead of token ids; its batching cost is its length."""

    @property
    def length(self) -> int:
        return max(1, len(self.meta["text"]) // CHARS_PER_TOKEN)


def _codes(languages: Sequence[str]) -> list[str]:
    return unique([c.lower() for c in languages])


LANGUAGES = ResultTable(
    "languages",
    (pa.field("language", pa.string()),  # ISO 639-1 code; NULL when no language can be told
     pa.field("confidence", pa.float64()), pa.field("n_chars", pa.int64())),
    upstream="'language': any_value(r.language), 'confidence': any_value(r.confidence)",
    doc="one row per document: its most likely language (NULL when it cannot be told)")


class LanguageParams(HeadParams):
    languages: Annotated[list[str], Expect("a list of ISO 639-1 codes")] = []
    """choose among these ISO 639-1 codes (at least 2; none: every language lingua knows)"""
    min_confidence: Number(ge=0, le=1) = 0.0
    """below it `language` is NULL"""
    max_chars: Annotated[int, Field(ge=1)] = 2000
    """detect on the first N characters (`n_chars` records how many were used)"""
    low_accuracy: bool = False
    """lingua's faster low-accuracy mode"""

    @field_validator("languages")
    @classmethod
    def _known(cls, langs: list[str]) -> list[str]:
        unknown = [c for c in langs if c.lower() not in LINGUA_CODES]
        if unknown:
            raise ValueError(f"unknown ISO 639-1 code(s) {', '.join(map(repr, unknown))} "
                             f"(lingua knows: {', '.join(sorted(LINGUA_CODES))})")
        if langs and len(_codes(langs)) < 2:
            raise ValueError(f"must name at least 2 distinct languages (or none for all), not {langs!r}")
        return langs


class LanguageHead(Head):
    task = "language"
    table = "languages"
    tables = (LANGUAGES,)
    model_class = None
    default_model = "lingua"
    Params = LanguageParams

    def setup(self) -> None:
        """Build the detector once; the lingua version goes into the params, hence into the model identity."""
        codes = sorted(_codes(self.p["languages"]))
        if codes:
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(IsoCode639_1.from_str(c) for c in codes))
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if self.p["low_accuracy"]:
            builder = builder.with_low_accuracy_mode()
        self.detector = builder.build()
        self.p = self.params_from_files(self.name, self.p, None)

    @classmethod
    def params_from_files(cls, name: str, p, folder) -> dict:
        """Canonical codes (lower-case, sorted: the same choice of languages is the same identity) and
        the lingua version (its models ship in the wheel), as `setup` records them."""
        return {**p, "languages": sorted(_codes(p["languages"])), "lingua_version": version("lingua-language-detector")}

    # --- no transformer: the model helpers of the base class do not apply ---------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _no_model(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} runs lingua; it has no transformer model or tokenizer")

    max_length = pad_id = collate = run_encoder = _no_model

    # --- the contract ---------------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        prefix = doc.text[:self.p["max_chars"]]
        text = prefix if any(c.isalpha() for c in prefix) else ""  # nothing to detect: lingua is skipped
        return [TextFeature(0, [], meta={"text": text, "n_chars": len(prefix)})]

    def forward(self, feats: Sequence[Feature]) -> list[tuple[str | None, float]]:
        """One parallel lingua call for the batch: (best language code or None, its confidence) per feature.

        lingua parallelises on its own (Rust) thread pool: RAYON_NUM_THREADS caps it, not torch's threads."""
        todo = [k for k, f in enumerate(feats) if f.meta["text"]]
        outs: list[tuple[str | None, float]] = [(None, 0.0)] * len(feats)
        values = self.detector.compute_language_confidence_values_in_parallel([feats[k].meta["text"] for k in todo])
        for k, ranked in zip(todo, values):
            outs[k] = best_language(ranked)
        return outs

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[tuple[str | None, float]]) -> list[dict]:
        (feat,), ((code, confidence),) = feats, outs
        if confidence < self.p["min_confidence"]:
            code = None
        return [{"language": code, "confidence": float(confidence), "n_chars": int(feat.meta["n_chars"])}]


def best_language(ranked: Sequence[Any]) -> tuple[str | None, float]:
    """The top of lingua's ranked confidence values; None when nothing scores or the top two tie
    (what `detect_language_of` answers then)."""
    if not ranked or ranked[0].value <= 0:
        return None, 0.0
    top = ranked[0]
    if len(ranked) > 1 and ranked[1].value == top.value:
        return None, float(top.value)
    return top.language.iso_code_639_1.name.lower(), float(top.value)
