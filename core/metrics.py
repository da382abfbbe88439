"""Evaluation metrics as pure functions: accuracy, macro F1, entity-level P/R/F1, SQuAD EM/F1."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Iterable[str] | None = None) -> float:
    """Mean per-label F1 over `labels` (default: labels seen in gold or pred)."""
    labels = sorted(set(labels) if labels is not None else set(gold) | set(pred))
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def entity_prf(gold: Sequence[Iterable[tuple]], pred: Sequence[Iterable[tuple]]) -> dict:
    """Entity-level precision/recall/F1 over documents: an entity counts only with the exact
    (start, end, label) of a gold one."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        tp += len(g & p)
        n_gold += len(g)
        n_pred += len(p)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_prf_by_label(gold: Sequence[Iterable[tuple]], pred: Sequence[Iterable[tuple]],
                        labels: Iterable[str] | None = None) -> dict[str, dict]:
    """`entity_prf` per entity type (the last element of each tuple), with the counts behind it:
    {label: {precision, recall, f1, n_gold, n_pred}} for `labels` (default: every label seen)."""
    gold, pred = [set(g) for g in gold], [set(p) for p in pred]
    seen = {e[-1] for doc in gold + pred for e in doc}
    out = {}
    for label in sorted(set(labels) if labels is not None else seen):
        g = [{e for e in doc if e[-1] == label} for doc in gold]
        p = [{e for e in doc if e[-1] == label} for doc in pred]
        out[label] = {**entity_prf(g, p), "n_gold": sum(map(len, g)), "n_pred": sum(map(len, p))}
    return out


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(gold: str, pred: str | None) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred or ""))


def token_f1(gold: str, pred: str | None) -> float:
    """SQuAD token F1 of the normalised answers (two empty answers score 1)."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred or "").split()
    if not g or not p:
        return float(g == p)
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)
