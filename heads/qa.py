"""Extractive question answering: `AutoModelForQuestionAnswering` start/end logits -> answer spans.

transformers 5 has no question-answering pipeline, so the decoding here follows the semantics of
the HF `QuestionAnsweringPipeline` of transformers 4.x (fast-tokenizer path):

* every question is paired with the document text (question first, `truncation="only_second"`);
  a long text becomes overlapping windows (`doc_stride` tokens of overlap), one feature per
  (question, window);
* per window, every token that is not a context token gets the logit -10000 (the CLS token is
  kept), start and end logits are soft-maxed separately, the null score is
  `p_start[CLS] * p_end[CLS]` (the minimum over the windows), then CLS is zeroed;
* candidate spans are pairs of context tokens `s <= e < s + max_answer_len` scored
  `p_start[s] * p_end[e]`; the best span over ALL windows of the question wins (ties: the earlier
  window, then the smaller start, then the smaller end, as the pipeline's stable sort and argmax);
* with `allow_no_answer` (the pipeline's `handle_impossible_answer`) the answer is None when the
  null score is strictly greater than the best span score.

Two deliberate differences with the pipeline. The answer is always `doc.text[start_char:end_char]`
with the character offsets of the span's first and last tokens (no widening to whole words). And
the pipeline only honours `max_question_len` on its slow-tokenizer path by truncating the
question; here questions are never truncated: `max_question_len` is validated and named in the
error raised when a question leaves no room for context in a `max_seq_len` window.

`max_seq_len` is capped to the model's limit. When a question leaves room for at most `doc_stride`
context tokens in a window (a long question, or a model whose limit is below the configured
`max_seq_len`), that question's windows overlap by half of the room instead: the tokenizer needs
stride < room (it panics otherwise), and a near-full overlap would multiply the windows.

`decode_answer` (and its parts `window_probs`, `best_span`) are pure functions of the per-window
logits, context masks and offsets, so they can be tested with hand-made logits.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from transformers import AutoModelForQuestionAnswering

from core.config import Expect, ParamError

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable, softmax, strings_from_column, unique

UNDESIRED_LOGIT = -10000.0  # the value the HF pipeline gives to non-context tokens


class QuestionTooLongError(DocumentError, ValueError):
    """A question that leaves no room for any context token in a model window."""


ANSWERS = ResultTable(
    "answers",
    (pa.field("question", pa.string()), pa.field("answer", pa.string()),
     pa.field("start_char", pa.int64()), pa.field("end_char", pa.int64()), pa.field("score", pa.float64()),
     pa.field("n_windows", pa.int32())),
    upstream=("'answer': arg_max(r.answer, r.score), 'score': max(r.score), "
              "'has_answer': coalesce(bool_or(coalesce(r.answer, '') <> ''), false)"),
    doc="one row per (document, question): the best span, or NULL when no answer wins")

Question = Annotated[str, Field(pattern=r"\S")]  # not blank


class QaParams(HeadParams):
    questions: Annotated[list[Question] | None, Expect("a list of non-empty strings")] = []
    """questions asked of every document"""
    question_column: Annotated[str, Field(min_length=1)] | None = None
    """corpus column with per-document question(s): a string or a list of strings"""
    max_seq_len: Annotated[int, Field(ge=1)] = 384
    """window in tokens (question + context), capped to the model's limit"""
    doc_stride: Annotated[int, Field(ge=1)] = 128
    """token overlap between windows of a long document"""
    max_answer_len: Annotated[int, Field(ge=1)] = 15
    """longest answer span in tokens"""
    max_question_len: Annotated[int, Field(ge=1)] = 64
    """named in the error when a question leaves no room for context (questions are never cut)"""
    allow_no_answer: bool = False
    """true: NULL answer when the no-answer score wins"""

    @model_validator(mode="after")
    def _rules(self):
        if not self.questions and not self.question_column:
            raise ValueError("the qa head needs questions: set `questions` and/or `question_column`")
        if self.doc_stride >= self.max_seq_len:
            raise ParamError("doc_stride", f"doc_stride ({self.doc_stride}) must be smaller than max_seq_len "
                                           f"({self.max_seq_len})")
        return self


class QuestionAnsweringHead(Head):
    task = "qa"
    table = "answers"
    tables = (ANSWERS,)
    model_class = AutoModelForQuestionAnswering
    Params = QaParams

    def setup(self) -> None:
        self.questions = unique([q.strip() for q in (self.p["questions"] or [])])
        self.question_column = self.p["question_column"]
        self.doc_stride = self.p["doc_stride"]
        # a model with a shorter limit caps the window; a stride that no longer fits is then
        # narrowed per question (see _stride_for), so the defaults work with small models too
        model_limit = self.max_length()
        self.max_seq_len = min(self.p["max_seq_len"], model_limit)
        self.n_special = self.tokenizer.num_special_tokens_to_add(pair=True)
        if self.max_seq_len - self.n_special < 2:
            capped = f" (capped to the model limit {model_limit})" if self.max_seq_len < self.p["max_seq_len"] else ""
            raise ValueError(f"max_seq_len {self.max_seq_len}{capped} leaves no room for a question and a context")
        self.max_answer_len = self.p["max_answer_len"]
        self.max_question_len = self.p["max_question_len"]
        self.allow_no_answer = self.p["allow_no_answer"]
        self.cls_id = self.tokenizer.cls_token_id
        # config questions are asked of every document: count their tokens once
        self._question_lengths = {q: self._count_tokens(q) for q in self.questions}
        for q in self.questions:  # a config question too long for the window would fail every document
            self._stride_for(q)

    @classmethod
    def columns_for(cls, p) -> list[str]:
        return [p["question_column"]] if p.get("question_column") else []

    def questions_for(self, doc: Doc) -> list[str]:
        """The config questions, then those of the question column; stripped, blanks and repeats dropped."""
        questions = list(self.questions)
        column = self.question_column
        if column:
            if column not in doc.fields:
                raise DocumentError(f"question column {column!r} is missing from the document's fields")
            questions.extend(strings_from_column(doc.fields[column], column, "question"))
        return unique(questions)

    # --- the contract -------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        questions = self.questions_for(doc)
        if not questions:
            return []
        if not doc.text or not doc.text.strip():
            raise DocumentError("empty text: there is no context to answer from")
        feats: list[Feature] = []
        for qi, question in enumerate(questions):
            stride = self._stride_for(question)
            try:
                enc = self.tokenizer(question, doc.text, truncation="only_second", max_length=self.max_seq_len,
                                     stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            except BaseException as exc:
                # the Rust tokenizer reports truncation problems with a panic (a BaseException):
                # turn it into a document failure instead of ending the whole run
                if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
                    raise DocumentError(f"tokenizer failed on question {qi}: {str(exc).strip()[:200]}") from exc
                raise
            types = enc.get("token_type_ids")
            n_windows = len(enc["input_ids"])
            for k in range(n_windows):
                ids = list(enc["input_ids"][k])
                seq = enc.sequence_ids(k)
                context = [s == 1 for s in seq]
                if k == 0 and n_windows == 1 and not any(context):
                    raise DocumentError("the text has no tokens to answer from (only spaces or characters "
                                        "the tokenizer drops)")
                cls_index = next((i for i, (t, s) in enumerate(zip(ids, seq))
                                  if s is None and self.cls_id is not None and t == self.cls_id), None)
                meta = {
                    "question": qi,
                    "window": k,
                    "offsets": [(int(a), int(b)) for a, b in enc["offset_mapping"][k]],
                    "context_mask": context,
                    "cls_index": cls_index,
                }
                feats.append(Feature(0, ids, list(types[k]) if types is not None else None, meta))
        return feats

    def forward(self, feats: Sequence[Feature]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = self.run_encoder(feats)
        start = out.start_logits.float().cpu().numpy()
        end = out.end_logits.float().cpu().numpy()
        return [(start[i, :f.length].copy(), end[i, :f.length].copy()) for i, f in enumerate(feats)]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[Any]) -> list[dict]:
        questions = self.questions_for(doc)
        if not questions:
            return []
        windows: dict[int, list[tuple[Feature, Any]]] = {qi: [] for qi in range(len(questions))}
        for f, o in zip(feats, outs):
            windows[f.meta["question"]].append((f, o))
        rows = []
        for qi, question in enumerate(questions):
            items = sorted(windows[qi], key=lambda fo: fo[0].meta["window"])
            if not items:
                raise ValueError(f"question {qi} ({question!r}) has no model outputs")
            rows.append(decode_answer(
                doc.text, question,
                start_logits=[o[0] for _, o in items],
                end_logits=[o[1] for _, o in items],
                context_masks=[f.meta["context_mask"] for f, _ in items],
                offsets=[f.meta["offsets"] for f, _ in items],
                max_answer_len=self.max_answer_len,
                allow_no_answer=self.allow_no_answer,
                cls_indices=[f.meta["cls_index"] for f, _ in items],
            ))
        return rows

    # --- helpers ------------------------------------------------------------------------
    def _count_tokens(self, question: str) -> int:
        return len(self.tokenizer(question, add_special_tokens=False)["input_ids"])

    def _stride_for(self, question: str) -> int:
        n_question = self._question_lengths.get(question)
        if n_question is None:
            n_question = self._count_tokens(question)
        room = self.max_seq_len - self.n_special - n_question
        if room < 1:
            over = (f" (more than max_question_len={self.max_question_len})"
                    if n_question > self.max_question_len else "")
            raise QuestionTooLongError(
                f"question of {n_question} tokens{over} leaves no room for context in a window of "
                f"max_seq_len={self.max_seq_len} tokens: {question[:80]!r}")
        return self.doc_stride if self.doc_stride < room else room // 2


# --- pure decoding ------------------------------------------------------------------------
def window_probs(start_logits: np.ndarray, end_logits: np.ndarray, context_mask: Sequence[bool],
                 cls_index: int | None = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Start and end probabilities of one window and its null score, as the HF pipeline computes them.

    Tokens that are neither context nor CLS get the logit -10000; start and end are soft-maxed
    separately; the null score is p_start[CLS] * p_end[CLS] (0.0 without a CLS token); CLS is then
    zeroed so it is never part of a span.
    """
    start = np.asarray(start_logits, dtype=np.float64).reshape(-1)
    end = np.asarray(end_logits, dtype=np.float64).reshape(-1)
    keep = np.asarray(context_mask, dtype=bool).reshape(-1).copy()
    if not (start.shape == end.shape == keep.shape):
        raise ValueError(f"window shapes differ: start {start.shape}, end {end.shape}, mask {keep.shape}")
    if cls_index is not None:
        keep[cls_index] = True
    p_start = softmax(np.where(keep, start, UNDESIRED_LOGIT))
    p_end = softmax(np.where(keep, end, UNDESIRED_LOGIT))
    null_score = 0.0
    if cls_index is not None:
        null_score = float(p_start[cls_index] * p_end[cls_index])
        p_start[cls_index] = p_end[cls_index] = 0.0
    return p_start, p_end, null_score


def best_span(p_start: np.ndarray, p_end: np.ndarray, context_mask: Sequence[bool],
              max_answer_len: int) -> tuple[int, int, float] | None:
    """The best (start, end, score) token span over context tokens with s <= e < s + max_answer_len.

    Ties go to the smaller start, then the smaller end. None when the window has no context token.
    """
    positions = np.flatnonzero(np.asarray(context_mask, dtype=bool))
    if positions.size == 0:
        return None
    scores = np.outer(p_start[positions], p_end[positions])
    gap = positions[None, :] - positions[:, None]
    valid = (gap >= 0) & (gap < max_answer_len)
    flat = int(np.argmax(np.where(valid, scores, -1.0)))
    i, j = divmod(flat, positions.size)
    return int(positions[i]), int(positions[j]), float(scores[i, j])


def decode_answer(text: str, question: str, start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
                  context_masks: Sequence[Sequence[bool]], offsets: Sequence[Sequence[tuple[int, int]]],
                  max_answer_len: int = 15, allow_no_answer: bool = False,
                  cls_indices: Sequence[int | None] | None = None) -> dict:
    """One answer row from the windows of one question (logits, context masks, char offsets per window).

    `cls_indices` gives the CLS position of each window (default 0, None for no CLS token).
    """
    n = len(start_logits)
    if n == 0 or not (len(end_logits) == len(context_masks) == len(offsets) == n):
        raise ValueError("decode_answer needs the same, non-zero number of windows in every argument")
    if cls_indices is None:
        cls_indices = [0] * n
    best: tuple[float, int, int, int] | None = None  # score, window, start token, end token
    null_score = math.inf
    for w in range(n):
        p_start, p_end, null = window_probs(start_logits[w], end_logits[w], context_masks[w], cls_indices[w])
        null_score = min(null_score, null)
        span = best_span(p_start, p_end, context_masks[w], max_answer_len)
        if span is not None and (best is None or span[2] > best[0]):
            best = (span[2], w, span[0], span[1])
    row = {"question": question, "answer": None, "start_char": None, "end_char": None,
           "score": float(null_score), "n_windows": n}
    if allow_no_answer and (best is None or null_score > best[0]):
        return row
    if best is None:
        raise ValueError("no context token in any window: no span to answer with")
    score, w, s, e = best
    start_char, end_char = int(offsets[w][s][0]), int(offsets[w][e][1])
    if not 0 <= start_char <= end_char <= len(text):
        raise ValueError(f"span offsets ({start_char}, {end_char}) do not fit a text of {len(text)} characters")
    row.update(answer=text[start_char:end_char], start_char=start_char, end_char=end_char, score=float(score))
    return row
