"""Sequence classification: softmax over `AutoModelForSequenceClassification` logits.

Long documents are not silently truncated: by default they are split into overlapping windows
whose probabilities are averaged (`long_text = "chunk"`, `n_chunks` recorded); `long_text =
"truncate"` keeps only the first window, as HF pipelines do, and says so in the row.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field
from transformers import AutoModelForSequenceClassification

from .base import Doc, Feature, Head, HeadParams, ResultTable, sigmoid, softmax

CLASSIFICATIONS = ResultTable(
    "classifications",
    (pa.field("label", pa.string()), pa.field("score", pa.float64()),
     pa.field("scores", pa.map_(pa.string(), pa.float64())),
     pa.field("n_chunks", pa.int32()), pa.field("long_text", pa.string())),
    upstream="'label': any_value(r.label), 'score': any_value(r.score), 'scores': any_value(r.scores)",
    doc="one row per document: the best label, its probability and every label's")


class ClassificationParams(HeadParams):
    long_text: Literal["chunk", "truncate"] = "chunk"
    """chunk: overlapping windows, probabilities averaged | truncate: the first window only"""
    stride: Annotated[int, Field(ge=0)] = 64
    """token overlap between windows"""


class ClassificationHead(Head):
    task = "classification"
    table = "classifications"
    tables = (CLASSIFICATIONS,)
    model_class = AutoModelForSequenceClassification
    Params = ClassificationParams

    def setup(self) -> None:
        cfg = self.model.config
        self.labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        # HF pipeline semantics: sigmoid for one label or multi-label models, softmax otherwise
        self.multi_label = cfg.num_labels == 1 or cfg.problem_type == "multi_label_classification"
        self.window = self.max_length()

    def encode(self, doc: Doc) -> list[Feature]:
        chunk = self.p["long_text"] == "chunk"
        stride = min(int(self.p["stride"]), self.window // 2)
        enc = self.tokenizer(doc.text, truncation=True, max_length=self.window, stride=stride if chunk else 0,
                             return_overflowing_tokens=chunk)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        if not ids or not isinstance(ids[0], list):
            ids, types = [ids], [types] if types is not None else None
        return [Feature(0, list(w), list(types[k]) if types is not None else None, {"window": k})
                for k, w in enumerate(ids)]

    def forward(self, feats: Sequence[Feature]) -> list[np.ndarray]:
        logits = self.run_encoder(feats).logits.float().cpu().numpy()
        return list(logits)

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[np.ndarray]) -> list[dict]:
        return [decode_classification(np.stack(outs), self.labels, self.multi_label, self.p["long_text"])]


def decode_classification(window_logits: np.ndarray, labels: list[str], multi_label: bool = False,
                          long_text: str = "chunk") -> dict:
    """Average the per-window probabilities, pick the best label."""
    probs = sigmoid(window_logits) if multi_label else softmax(window_logits, axis=-1)
    mean = probs.mean(axis=0)
    best = int(mean.argmax())
    return {
        "label": labels[best],
        "score": float(mean[best]),
        "scores": {labels[i]: float(mean[i]) for i in range(len(labels))},
        "n_chunks": int(window_logits.shape[0]),
        "long_text": long_text,
    }
