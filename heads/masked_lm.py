"""Masked language models: `AutoModelForMaskedLM` -> fill-mask predictions or pseudo-perplexity.

Two modes (`mode` param), each writing its own table:

* ``fill_mask`` (table ``fill_mask``): for every occurrence of the tokenizer's mask token in a
  document (``mask_index`` 0, 1, 2 ... in document order), the ``top_k`` vocabulary tokens with
  their softmax probabilities at that position, as the HF fill-mask pipeline computes them (all
  masks of a window are masked together; ``token`` is ``tokenizer.decode([id]).strip()``, the
  pipeline's ``token_str``). Ties in probability go to the smaller token id. A document without a
  mask token gives no rows.
* ``pseudo_perplexity`` (table ``lm_scores``, Salazar et al. 2020, "Masked Language Model
  Scoring"): every scorable token is replaced by the mask token in turn and scored
  ``log p(original token)``; ``PPPL = exp(-mean log p)``. Scorable = a token of the text (not one
  added by the tokenizer's post-processor) whose id is not a special id ([UNK], a literal
  "[MASK]" or "[SEP]" in the text ...): those stay as context but are not scored. A document with
  no scorable token fails (``NoScorableTokensError``, a ``ValueError``).

Long documents are split into overlapping windows (``stride`` tokens of overlap, capped at half the
window's text capacity, as the NER head does). Each mask (fill_mask) and each scored token
(pseudo_perplexity) is predicted in the single window where it is most central -- the window
choice of `heads.ner.choose_windows` -- so every token is scored exactly once.

Batching is the engine's: in pseudo_perplexity mode every masked copy of a window is one
`Feature` (copies of one window have the same length, so the engine packs them tightly, across
documents). `forward` keeps only what `decode` needs: the top_k ids and probabilities at the mask
positions (fill_mask), or one log-probability per feature (pseudo_perplexity). Note that the model
itself still materialises `[batch, length, vocab]` logits for each batch: with a 30k vocabulary a
`batch_tokens` of about 1024 keeps that transient tensor near 125 MB.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from transformers import AutoModelForMaskedLM

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable
from .causal_lm import LM_SCORES
from .ner import choose_windows, tokenize_windows

MODES = ("fill_mask", "pseudo_perplexity")
TABLES = {"fill_mask": "fill_mask", "pseudo_perplexity": "lm_scores"}


class NoScorableTokensError(DocumentError, ValueError):
    """A document with no token to score in pseudo_perplexity mode."""


FILL_MASK = ResultTable(
    "fill_mask",
    (pa.field("mask_index", pa.int32()), pa.field("token", pa.string()), pa.field("token_id", pa.int64()),
     pa.field("score", pa.float64()), pa.field("rank", pa.int32())),
    upstream="'n': count(r.doc_id)",
    doc="one row per mask token and candidate: the top_k predictions with their probabilities")


class MaskedLMParams(HeadParams):
    mode: Literal["fill_mask", "pseudo_perplexity"] = "fill_mask"
    """fill_mask -> `fill_mask` | pseudo_perplexity -> `lm_scores`"""
    top_k: Annotated[int, Field(ge=1)] = 5
    """fill_mask: predictions kept per mask"""
    stride: Annotated[int, Field(ge=0)] = 128
    """token overlap between windows of a long document"""


class MaskedLMHead(Head):
    task = "masked_lm"
    table = "fill_mask"
    tables = (FILL_MASK, LM_SCORES)
    model_class = AutoModelForMaskedLM
    Params = MaskedLMParams

    @classmethod
    def table_for(cls, p) -> str:
        return TABLES[p.get("mode", cls.params["mode"])]

    def setup(self) -> None:
        self.mode = self.p["mode"]
        self.table = TABLES[self.mode]
        self.top_k = int(self.p["top_k"])
        self.mask_id = self.tokenizer.mask_token_id
        if self.tokenizer.mask_token is None or self.mask_id is None:
            raise ValueError("the tokenizer has no mask token: a masked_lm head needs one")
        self.mask_token = str(self.tokenizer.mask_token)
        self.window = self.max_length()
        capacity = self.window - self.tokenizer.num_special_tokens_to_add(pair=False)
        if capacity < 1:
            raise ValueError(f"model window {self.window} leaves no room for text tokens")
        # the tokenizer needs stride < capacity; half a window of overlap already gives every
        # token a window where it has >= stride/2 tokens of context on each side
        self.stride = min(int(self.p["stride"]), capacity // 2)
        self.special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)

    # --- encode -------------------------------------------------------------------------
    def _windows(self, text: str) -> dict:
        return tokenize_windows(self.tokenizer, text, self.window, self.stride)

    def encode(self, doc: Doc) -> list[Feature]:
        if self.mode == "fill_mask":
            if self.mask_token not in doc.text:  # cheap: most documents have no mask
                return []
            w = self._windows(doc.text)
            plan = plan_fill_mask(w["ids"], w["positions"], self.mask_id)
        else:
            w = self._windows(doc.text)
            plan = plan_pseudo_perplexity(w["ids"], w["positions"], self.special_ids)
            if not plan:
                raise NoScorableTokensError(
                    "no scorable token: the text is empty or only special/unknown tokens, "
                    "so its pseudo-perplexity is undefined")
        n_windows = len(w["ids"])
        feats = []
        for item in plan:
            k = item["window"]
            types = w["types"][k] if w["types"] is not None else None
            ids = w["ids"][k]
            if self.mode == "pseudo_perplexity":
                ids = list(ids)
                ids[item["position"]] = self.mask_id
                meta = {"window": k, "n_windows": n_windows, "token": item["token"],
                        "position": item["position"], "target_id": item["target_id"]}
            else:
                meta = {"window": k, "n_windows": n_windows, "positions": item["positions"],
                        "mask_index": item["mask_index"]}
            feats.append(Feature(0, ids, types, meta))
        return feats

    # --- forward ------------------------------------------------------------------------
    def _logits_at(self, feats: Sequence[Feature], rows: list[int], cols: list[int]) -> torch.Tensor:
        """Vocabulary logits at (feature, position) pairs only.

        The LM head (hidden -> vocabulary) is applied to the masked positions, not to every token
        of the batch: for a 30k vocabulary that is most of the work and most of the memory. Models
        whose head is not a separate position-wise module fall back to the full logits.
        """
        with torch.inference_mode():
            batch = self.collate(feats)
            r = torch.tensor(rows, dtype=torch.long, device=self.device)
            c = torch.tensor(cols, dtype=torch.long, device=self.device)
            head = next((getattr(self.model, n) for n in ("cls", "lm_head") if hasattr(self.model, n)), None)
            if head is not None:
                hidden = self.model.base_model(**batch).last_hidden_state
                return head(hidden[r, c]).float()
            return self.model(**batch).logits[r, c].float()

    def forward(self, feats: Sequence[Feature]) -> list[Any]:
        if self.mode == "pseudo_perplexity":
            logits = self._logits_at(feats, list(range(len(feats))), [f.meta["position"] for f in feats])
            targets = torch.tensor([f.meta["target_id"] for f in feats], dtype=torch.long, device=logits.device)
            picked = logits.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0].cpu().numpy()
            return [float(x) for x in picked]
        rows = [i for i, f in enumerate(feats) for _ in f.meta["positions"]]
        cols = [p for f in feats for p in f.meta["positions"]]
        probs = self._logits_at(feats, rows, cols).softmax(dim=-1).cpu().numpy()
        outs, k = [], 0
        for f in feats:
            n = len(f.meta["positions"])
            ids, scores = top_k(probs[k:k + n], self.top_k)
            outs.append({"token_ids": ids, "scores": scores})
            k += n
        return outs

    # --- decode -------------------------------------------------------------------------
    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[Any]) -> list[dict]:
        if self.mode == "pseudo_perplexity":
            n_windows = feats[0].meta["n_windows"] if feats else 0
            return [pseudo_perplexity_row([f.meta["token"] for f in feats], list(outs), n_windows)]
        mask_index = [m for f in feats for m in f.meta["mask_index"]]
        ids = [row for o in outs for row in o["token_ids"]]
        scores = [row for o in outs for row in o["scores"]]
        return fill_mask_rows(mask_index, ids, scores, self.token_str)

    def token_str(self, token_id: int) -> str:
        """The fill-mask pipeline's `token_str`, stripped."""
        return self.tokenizer.decode([int(token_id)]).strip()


# --- pure helpers ------------------------------------------------------------------------------

def plan_fill_mask(window_ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray],
                   mask_id: int) -> list[dict]:
    """Which window predicts which mask: one entry per window that gets at least one mask.

    Masks are the document tokens whose id is `mask_id`, numbered 0, 1, ... in document order
    (`mask_index`); each goes to the window where it is most central (`choose_windows`).
    Entries: {"window": k, "positions": [j, ...], "mask_index": [m, ...]} in window order,
    positions ascending.
    """
    positions = [np.asarray(p, dtype=np.int64) for p in positions]
    doc_ids = document_ids(window_ids, positions)
    masks = np.flatnonzero(doc_ids == mask_id)
    if len(masks) == 0:
        return []
    win, local = choose_windows(positions, len(doc_ids))
    plan: dict[int, dict] = {}
    for m, t in enumerate(masks):
        k = int(win[t])
        entry = plan.setdefault(k, {"window": k, "positions": [], "mask_index": []})
        entry["positions"].append(int(local[t]))
        entry["mask_index"].append(m)
    return [plan[k] for k in sorted(plan)]


def plan_pseudo_perplexity(window_ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray],
                           special_ids: Sequence[int] | frozenset = ()) -> list[dict]:
    """One entry per scorable document token: the window where it is most central and its position.

    A document token is scorable when its id is not in `special_ids`. Entries, in document order:
    {"token": t, "window": k, "position": j, "target_id": id}.
    """
    positions = [np.asarray(p, dtype=np.int64) for p in positions]
    doc_ids = document_ids(window_ids, positions)
    if len(doc_ids) == 0:
        return []
    win, local = choose_windows(positions, len(doc_ids))
    special = set(int(i) for i in special_ids)
    return [{"token": t, "window": int(win[t]), "position": int(local[t]), "target_id": int(doc_ids[t])}
            for t in range(len(doc_ids)) if int(doc_ids[t]) not in special]


def document_ids(window_ids: Sequence[Sequence[int]], positions: Sequence[np.ndarray]) -> np.ndarray:
    """The id of every document token, read from the windows (they must agree where they overlap)."""
    n = max((int(np.max(p)) + 1 for p in positions if len(p)), default=0)
    ids = np.full(n, -1, dtype=np.int64)
    for k, (w, pos) in enumerate(zip(window_ids, positions)):
        pos = np.asarray(pos, dtype=np.int64)
        sel = pos >= 0
        w = np.asarray(w, dtype=np.int64)
        prev = ids[pos[sel]]
        clash = (prev >= 0) & (prev != w[sel])
        if clash.any():
            raise ValueError(f"window {k} disagrees with an earlier window on token {int(pos[sel][clash][0])}")
        ids[pos[sel]] = w[sel]
    if (ids < 0).any():
        raise ValueError(f"token {int(np.flatnonzero(ids < 0)[0])} of the document is in no window")
    return ids


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of `probs` [n, vocab]: (ids [n, k], scores [n, k]).

    Ordered by decreasing score, ties by increasing id (deterministic, unlike `torch.topk`).
    `k` is capped at the vocabulary size.
    """
    probs = np.asarray(probs)
    if probs.ndim == 1:
        probs = probs[None]
    n, vocab = probs.shape
    k = min(int(k), vocab)
    ids = np.zeros((n, k), dtype=np.int64)
    scores = np.zeros((n, k), dtype=probs.dtype)
    for r in range(n):
        p = probs[r]
        if k < vocab:
            kth = p[np.argpartition(-p, k - 1)[k - 1]]
            above = np.flatnonzero(p > kth)
            ties = np.flatnonzero(p == kth)[:k - len(above)]
            sel = np.concatenate([above, ties])
        else:
            sel = np.arange(vocab)
        order = np.lexsort((sel, -p[sel]))
        ids[r] = sel[order]
        scores[r] = p[sel[order]]
    return ids, scores


def fill_mask_rows(mask_index: Sequence[int], token_ids: Sequence[Sequence[int]],
                   scores: Sequence[Sequence[float]], token_str: Callable[[int], str]) -> list[dict]:
    """Rows of the `fill_mask` table, sorted by mask_index then rank.

    `token_ids[i]` / `scores[i]` are the ranked predictions for mask `mask_index[i]`.
    """
    if len(set(mask_index)) != len(mask_index):
        raise ValueError("a mask was predicted twice")
    rows = []
    for i in sorted(range(len(mask_index)), key=lambda i: mask_index[i]):
        for rank, (tid, score) in enumerate(zip(token_ids[i], scores[i]), start=1):
            rows.append({"mask_index": int(mask_index[i]), "token": token_str(int(tid)), "token_id": int(tid),
                         "score": float(score), "rank": rank})
    return rows


def pseudo_perplexity_row(tokens: Sequence[int], log_probs: Sequence[float], n_windows: int) -> dict:
    """The `lm_scores` row of one document from the log p of each of its scored tokens."""
    if len(log_probs) == 0:
        raise NoScorableTokensError("no scorable token: pseudo-perplexity is undefined")
    if len(tokens) != len(log_probs):
        raise ValueError(f"{len(tokens)} tokens but {len(log_probs)} log-probabilities")
    if len(set(tokens)) != len(tokens):
        raise ValueError("a token was scored twice")
    lp = np.asarray(log_probs, dtype=np.float64)
    mean = float(lp.mean())
    return {"pseudo_perplexity": float(math.exp(-mean)), "n_tokens": int(len(lp)), "mean_log_prob": mean,
            "n_windows": int(n_windows)}
