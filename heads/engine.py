"""The shared batching engine: every head runs through `pipe`.

Features of many documents are sorted by token length and packed into batches whose padded size
(longest feature x batch size) stays under a token budget, so short documents are not padded to the
length of long ones. Outputs are put back in document order before decoding. A batch that raises is
split in halves until the failing feature is found: only its document fails, the rest still lands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .base import Doc, Feature, Head

DEFAULT_TOKEN_BUDGET = 4096  # padded tokens per batch; 2k-4k is fastest on CPU (see notes)


@dataclass
class DocResult:
    doc: Doc
    rows: list[dict] = field(default_factory=list)
    error: str | None = None  # set when the document failed; rows is then empty
    stage: str | None = None  # encode | forward | decode


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int = 512) -> list[list[int]]:
    """Group feature indices into batches, shortest first, so that max_len * size <= budget.

    A single feature longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(lengths[i], 1)
        # sorted ascending, so the newcomer is the longest of the batch
        if current and (n * (len(current) + 1) > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)


def _document_fault(exc: BaseException) -> bool:
    """Errors a document can cause (incl. Rust tokenizer panics, which are BaseExceptions)."""
    return not isinstance(exc, _FATAL)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def pipe(head: Head, docs: Sequence[Doc], token_budget: int = DEFAULT_TOKEN_BUDGET,
         max_batch_size: int = 512) -> list[DocResult]:
    """Run `head` over `docs`; one DocResult per document, in input order."""
    results = [DocResult(doc) for doc in docs]
    feats: list[Feature] = []
    for i, doc in enumerate(docs):
        try:
            doc_feats = head.encode(doc)
        except BaseException as exc:  # a document the tokenizer or head rejects
            if not _document_fault(exc):
                raise
            results[i].error, results[i].stage = _describe(exc), "encode"
            continue
        for f in doc_feats:
            f.doc_index = i
        feats.extend(doc_feats)

    outs: list[Any] = [None] * len(feats)
    failed_feature: dict[int, str] = {}

    def run(idx: list[int]) -> None:
        try:
            batch_outs = head.forward([feats[j] for j in idx])
            if len(batch_outs) != len(idx):
                raise RuntimeError(f"head returned {len(batch_outs)} outputs for {len(idx)} inputs")
        except BaseException as exc:
            if not _document_fault(exc):
                raise
            if len(idx) == 1:
                failed_feature[idx[0]] = _describe(exc)
                return
            mid = len(idx) // 2
            run(idx[:mid])
            run(idx[mid:])
            return
        for j, o in zip(idx, batch_outs):
            outs[j] = o

    for batch in plan_batches([f.length for f in feats], token_budget, max_batch_size):
        run(batch)

    by_doc: dict[int, list[int]] = {}
    for j, f in enumerate(feats):
        by_doc.setdefault(f.doc_index, []).append(j)
    for j, reason in failed_feature.items():
        r = results[feats[j].doc_index]
        if r.error is None:
            r.error, r.stage = reason, "forward"

    for i, r in enumerate(results):
        if r.error is not None:
            continue
        idx = by_doc.get(i, [])
        try:
            r.rows = head.decode(r.doc, [feats[j] for j in idx], [outs[j] for j in idx])
        except BaseException as exc:
            if not _document_fault(exc):
                raise
            r.error, r.stage, r.rows = _describe(exc), "decode", []
    return results
