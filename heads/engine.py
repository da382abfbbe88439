"""The shared batching engine: every head runs through `pipe`.

Features of many documents are sorted by token length and packed into batches whose padded size
(longest feature x batch size) stays under a token budget, so short documents are not padded to the
length of long ones. Outputs are put back in document order before decoding.

Faults are decided here, in one place. A document's fault fails that document only: a batch that
raises one is split in halves until the failing feature is found, and the rest still lands.
- terminal: `DocumentError` (a prompt longer than the window, text the tokenizer rejects; a Rust
  tokenizer panic counts as one);
- transient: `TransientDocumentError`, a timeout, or out of memory on a single feature (the budget
  is halved first, so only a feature that never fits fails).
Any other exception is a bug or a broken model, not the document's fault: it propagates, and the
unit fails loudly instead of quietly filling `failed_docs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from core.config import DEFAULT_BATCH_TOKENS
from core.doc import Doc
from core.errors import DocumentError, TransientDocumentError
from core.faults import injected_failure

from .base import Feature, Head

DEFAULT_TOKEN_BUDGET = DEFAULT_BATCH_TOKENS  # padded tokens per batch (a head's batch_tokens)
GPU_TOKEN_BUDGET = (8192, 131072)  # bounds of `batch_tokens = "auto"` on CUDA
# `batch_tokens = "auto"` for ONNX Runtime on CPU: its fused kernels peak at smaller batches than torch's
# (short documents, 1,024 vs 4,096 tokens: float32 +25%, int8 +30% docs/s; 512-token articles +8%)
ORT_CPU_TOKEN_BUDGET = 1024


def auto_token_budget(head: Head) -> int:
    """`batch_tokens = "auto"`: the CPU optimum (4096, measured: benchmarks/README.md) on CPU, 1024 for the
    onnxruntime backend there; on CUDA, a quarter of the device's free memory over the activations one
    token needs in one layer (hidden states, attention projections, the feed-forward inner layer, in the
    model's precision), within GPU_TOKEN_BUDGET: big batches keep a GPU busy, the back-off on out-of-memory stays."""
    model = getattr(head, "model", None)
    try:
        device = head.device
    except Exception:  # a model-free head
        return DEFAULT_TOKEN_BUDGET
    if getattr(device, "type", "cpu") != "cuda":
        return ORT_CPU_TOKEN_BUDGET if getattr(head, "backend", "torch") == "onnxruntime" else DEFAULT_TOKEN_BUDGET
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 768))
    inner = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "encoder_ffn_dim", 4 * hidden))
    width = next(head.model.parameters()).element_size()
    per_token = width * (8 * hidden + 2 * inner)
    return int(min(max(free // 4 // per_token, GPU_TOKEN_BUDGET[0]), GPU_TOKEN_BUDGET[1]))


@dataclass
class DocResult:
    doc: Doc
    rows: list[dict] = field(default_factory=list)
    error: str | None = None  # set when the document failed; rows is then empty
    stage: str | None = None  # encode | forward | decode
    kind: str | None = None  # terminal | transient, when it failed


MIN_FILL = Head.batch_min_fill  # a batch stops growing when padding would pass 5% of its tokens ...
MIN_BATCH_TOKENS = 512  # ... once it is big enough for efficient GEMMs (measured: +10% docs/s)


def _take(sorted_lengths: Sequence[int], budget: int, max_batch_size: int, min_fill: float = MIN_FILL) -> int:
    """How many of these ascending lengths make the next batch (at least one).

    The batch grows while its padded size (longest x count) fits the budget and, once it holds
    MIN_BATCH_TOKENS, while real tokens stay at least `min_fill` of the padded ones.
    """
    n, real = 1, max(sorted_lengths[0], 1) if sorted_lengths else 0
    while n < len(sorted_lengths) and n < max_batch_size:
        longest = max(sorted_lengths[n], 1)
        if longest * (n + 1) > budget:
            break
        if (real + longest) < min_fill * longest * (n + 1) and longest * n >= MIN_BATCH_TOKENS:
            break
        real += longest
        n += 1
    return min(n, len(sorted_lengths))


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int = 512,
                 min_fill: float = MIN_FILL) -> list[list[int]]:
    """Group feature indices into batches, shortest first, so that max_len * size <= budget.

    A single feature longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    while order:
        n = _take([lengths[i] for i in order[:max_batch_size]], token_budget, max_batch_size, min_fill)
        batches.append(order[:n])
        order = order[n:]
    return batches


_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _is_oom(exc: BaseException) -> bool:
    """Out of memory on CPU (MemoryError, allocator errors) or GPU (torch.OutOfMemoryError)."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text)


def _release_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _fault_kind(exc: BaseException) -> str | None:
    """'terminal' or 'transient' for a document's fault; None when the exception is not one (a bug, a
    broken model, an interrupt): the caller re-raises it."""
    if isinstance(exc, _FATAL):
        return None
    if isinstance(exc, DocumentError):
        return "terminal"
    if isinstance(exc, (TransientDocumentError, TimeoutError)) or _is_oom(exc):
        return "transient"
    if not isinstance(exc, Exception):  # a Rust tokenizer panic (pyo3's PanicException): it rejects the text
        return "terminal"
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def pipe(head: Head, docs: Sequence[Doc], token_budget: int | str = DEFAULT_TOKEN_BUDGET,
         max_batch_size: int = 512, stats: dict | None = None) -> list[DocResult]:
    """Run `head` over `docs`; one DocResult per document, in input order.

    On out-of-memory the token budget is halved for the rest of the call and the batch retried;
    a single feature that still does not fit fails its document only. `stats`, when given, receives
    batches, padded and real token counts, OOM back-offs and the final budget.
    """
    if token_budget == "auto":
        token_budget = auto_token_budget(head)
    results = [DocResult(doc) for doc in docs]

    def fail(r: DocResult, reason: str, stage: str, kind: str) -> None:
        r.error, r.stage, r.kind, r.rows = reason, stage, kind, []

    feats: list[Feature] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc.text, str):  # the reader refuses these; callers of pipe may not
            fail(results[i], f"text is not a string ({type(doc.text).__name__})", "encode", "terminal")
            continue
        try:
            doc_feats = head.encode(doc)
        except BaseException as exc:  # a document the tokenizer or head rejects
            kind = _fault_kind(exc)
            if kind is None:
                raise
            fail(results[i], _describe(exc), "encode", kind)
            continue
        for f in doc_feats:
            f.doc_index = i
        feats.extend(doc_feats)

    outs: list[Any] = [None] * len(feats)
    failed_feature: dict[int, tuple[str, str]] = {}  # feature -> (reason, kind)
    lengths = [f.length for f in feats]
    counters = {"batches": 0, "padded_tokens": 0, "real_tokens": sum(lengths), "oom_backoffs": 0}
    budget = token_budget
    min_fill = head.batch_min_fill

    def forward(idx: list[int]) -> list[Any]:
        injected = injected_failure(head.name, (docs[feats[j].doc_index].doc_id for j in idx))
        if injected == "terminal":
            raise DocumentError("injected terminal fault (TASKHEADS_FAIL_DOCS)")
        if injected:
            raise MemoryError("simulated out of memory (TASKHEADS_FAIL_DOCS)")
        batch_outs = head.forward([feats[j] for j in idx])
        if len(batch_outs) != len(idx):
            raise RuntimeError(f"head returned {len(batch_outs)} outputs for {len(idx)} inputs")
        return batch_outs

    def run(idx: list[int]) -> None:
        """Forward one batch; bisect on a document fault so only the bad feature fails."""
        nonlocal budget
        try:
            counters["batches"] += 1
            counters["padded_tokens"] += max(lengths[j] for j in idx) * len(idx)
            batch_outs = forward(idx)
        except BaseException as exc:
            kind = _fault_kind(exc)
            if kind is None:
                raise
            if _is_oom(exc):
                _release_memory()
                if len(idx) == 1:
                    failed_feature[idx[0]] = (f"out of memory on {lengths[idx[0]]} tokens ({_describe(exc)})", kind)
                    return
                counters["oom_backoffs"] += 1
                budget = max(budget // 2, 1)
                for part in plan_batches([lengths[j] for j in idx], budget, max_batch_size, min_fill):
                    run([idx[k] for k in part])
                return
            if len(idx) == 1:
                failed_feature[idx[0]] = (_describe(exc), kind)
                return
            mid = len(idx) // 2
            run(idx[:mid])
            run(idx[mid:])
            return
        for j, o in zip(idx, batch_outs):
            outs[j] = o

    pending = sorted(range(len(feats)), key=lambda j: (lengths[j], j))
    while pending:  # one batch at a time, so a reduced budget applies to the rest at once
        n = _take([lengths[j] for j in pending[:max_batch_size]], budget, max_batch_size, min_fill)
        run(pending[:n])
        pending = pending[n:]
    if stats is not None:
        stats.update(counters, final_budget=budget)

    by_doc: dict[int, list[int]] = {}
    for j, f in enumerate(feats):
        by_doc.setdefault(f.doc_index, []).append(j)
    for j, (reason, kind) in failed_feature.items():
        r = results[feats[j].doc_index]
        if r.error is None:
            fail(r, reason, "forward", kind)

    for i, r in enumerate(results):
        if r.error is not None:
            continue
        idx = by_doc.get(i, [])
        try:
            r.rows = head.decode(r.doc, [feats[j] for j in idx], [outs[j] for j in idx])
        except BaseException as exc:
            kind = _fault_kind(exc)
            if kind is None:
                raise
            fail(r, _describe(exc), "decode", kind)
    return results
