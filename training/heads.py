"""Trainers for the three encoder heads: base encoder folder + labelled rows -> HF folder + metrics.

Targets are built from the fast tokenizer's character offsets (pure functions below, testable
without a model). Evaluation always reloads the SAVED folder with `heads.loading.load_head` and
predicts through `heads.engine.pipe`, so the metrics describe exactly what a corpus run produces.
"""
from __future__ import annotations

import time
from typing import Sequence

from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from heads.base import Doc, model_max_length
from heads.engine import pipe
from heads.loading import load_head

from .loop import IGNORE_INDEX, fit, load_base, save
from core.metrics import accuracy, entity_prf, exact_match, macro_f1, token_f1

QA_MAX_LENGTH = 384
QA_STRIDE = 128


def _fit_save_evaluate(model, tokenizer, examples, out_dir: str, evaluate, n_train: int, **fit_options) -> dict:
    """The tail every trainer shares: fit, save the folder, evaluate the saved folder, report."""
    stats = fit(model, examples, _pad_id(tokenizer), **fit_options)
    save(model, tokenizer, out_dir)
    started = time.perf_counter()
    metrics = evaluate()
    return {**stats, "n_train": n_train, **metrics, "eval_seconds": round(time.perf_counter() - started, 1)}


def _label_maps(labels: Sequence[str]) -> dict:
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _pad_id(tokenizer) -> int:
    return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def predict(head_name: str, task: str, out_dir: str, docs: Sequence[Doc], params: dict | None = None) -> list[list[dict]]:
    """Rows per document from the saved folder, through the corpus code path; a failed document raises."""
    head = load_head(head_name, task, out_dir, params=params, device="cpu")
    results = pipe(head, docs)
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"evaluation document {r.doc.doc_id} failed at {r.stage}: {r.error}")
    return [r.rows for r in results]


# --- sequence classification ------------------------------------------------------------------

def train_classifier(base_model: str, out_dir: str, train: list[dict], eval: list[dict], epochs: float = 2,
                     lr: float = 5e-5, batch_size: int = 16, max_length: int = 256, seed: int = 0,
                     progress: bool = True) -> dict:
    """Rows {"text", "label"}; labels sorted into id2label. Returns accuracy and macro_f1 on `eval`."""
    labels = sorted({r["label"] for r in train})
    model, tokenizer = load_base(AutoModelForSequenceClassification, base_model, **_label_maps(labels))
    label2id = model.config.label2id
    max_length = min(max_length, model_max_length(model, tokenizer))
    enc = tokenizer([r["text"] for r in train], truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    examples = [{"input_ids": ids, "token_type_ids": types[i] if types is not None else None,
                 "labels": label2id[train[i]["label"]]} for i, ids in enumerate(enc["input_ids"])]
    return _fit_save_evaluate(model, tokenizer, examples, out_dir, lambda: evaluate_classifier(out_dir, eval),
                              len(train),
                              epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                              desc="classification")


def evaluate_classifier(out_dir: str, rows: Sequence[dict]) -> dict:
    docs = [Doc(str(i), r["text"]) for i, r in enumerate(rows)]
    pred = [out[0]["label"] for out in predict("training-eval", "classification", out_dir, docs)]
    gold = [r["label"] for r in rows]
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred), "n": len(rows)}


# --- token classification (NER) ---------------------------------------------------------------

def bio_labels(entity_types: Sequence[str]) -> list[str]:
    """O, then B-/I- of each entity type in sorted order."""
    return ["O"] + [f"{bi}-{t}" for t in sorted(set(entity_types)) for bi in ("B", "I")]


def bio_tags(offsets: Sequence[tuple[int, int]], special_mask: Sequence[int], entities: Sequence[dict]) -> list[str | None]:
    """BIO tag of every token from character spans; None for special tokens.

    A token inside an entity (overlapping its span) is B- when it is the entity's first token and
    I- after it, so the following subwords of a word carry the word's entity too.
    """
    spans = sorted((int(e["start"]), int(e["end"]), e["label"]) for e in entities)
    tags: list[str | None] = []
    previous_entity = None
    for (start, end), special in zip(offsets, special_mask):
        if special:
            tags.append(None)
            continue
        hit = next((s for s in spans if start < s[1] and end > s[0] and end > start), None)
        if hit is None:
            tags.append("O")
        else:
            tags.append(("I-" if hit == previous_entity else "B-") + hit[2])
        previous_entity = hit
    return tags


def token_examples(tokenizer, rows: Sequence[dict], label2id: dict, max_length: int, stride: int) -> list[dict]:
    """Windows of every row (long rows overlap by `stride`) with per-token label ids."""
    stride = min(stride, (max_length - tokenizer.num_special_tokens_to_add(pair=False)) // 2)
    examples = []
    for row in rows:
        enc = tokenizer(row["text"], truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        types = enc.get("token_type_ids")
        for k, ids in enumerate(enc["input_ids"]):
            tags = bio_tags(enc["offset_mapping"][k], enc["special_tokens_mask"][k], row.get("entities") or [])
            examples.append({"input_ids": ids, "token_type_ids": types[k] if types is not None else None,
                             "labels": [IGNORE_INDEX if t is None else label2id[t] for t in tags]})
    return examples


def train_token_classifier(base_model: str, out_dir: str, train: list[dict], eval: list[dict], epochs: float = 2,
                           lr: float = 5e-5, batch_size: int = 16, max_length: int = 256, stride: int = 64,
                           seed: int = 0, progress: bool = True, aggregation: str = "simple",
                           decode_params: dict | None = None) -> dict:
    """Rows {"text", "entities": [{"start", "end", "label"}]}. Returns entity-level P/R/F1 on `eval`,
    decoded with `aggregation` or the head params `decode_params` (those of the corpus config that
    will run the folder: aggregation, words, drop_punctuation, stop_words)."""
    labels = bio_labels([e["label"] for r in train for e in r.get("entities") or []])
    model, tokenizer = load_base(AutoModelForTokenClassification, base_model, **_label_maps(labels))
    max_length = min(max_length, model_max_length(model, tokenizer))
    examples = token_examples(tokenizer, train, model.config.label2id, max_length, stride)
    return _fit_save_evaluate(model, tokenizer, examples, out_dir,
                              lambda: evaluate_token_classifier(out_dir, eval, aggregation, decode_params), len(train),
                              epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                              desc="ner")


def evaluate_token_classifier(out_dir: str, rows: Sequence[dict], aggregation: str = "simple",
                              params: dict | None = None) -> dict:
    """Decoded by the NER head (BIO grouping, `aggregation`, or the head `params`) into character
    spans, exact span + type."""
    docs = [Doc(str(i), r["text"]) for i, r in enumerate(rows)]
    outs = predict("training-eval", "ner", out_dir, docs, params={"aggregation": aggregation, **(params or {})})
    pred = [{(e["start_char"], e["end_char"], e["entity_group"]) for e in out} for out in outs]
    gold = [{(int(e["start"]), int(e["end"]), e["label"]) for e in r.get("entities") or []} for r in rows]
    scores = entity_prf(gold, pred)
    return {"entity_precision": scores["precision"], "entity_recall": scores["recall"],
            "entity_f1": scores["f1"], "n": len(rows)}


# --- extractive question answering ------------------------------------------------------------

def answer_positions(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None],
                     answer_start: int, answer_end: int, cls_index: int = 0) -> tuple[int, int]:
    """Start and end token of a character span inside one window; (cls, cls) when the answer is not
    wholly inside the window's context (the HF recipe)."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > answer_start or offsets[context[-1]][1] < answer_end:
        return cls_index, cls_index
    start = next(i for i in context if offsets[i][1] > answer_start)
    end = next(i for i in reversed(context) if offsets[i][0] < answer_end)
    return start, end


def qa_examples(tokenizer, rows: Sequence[dict], max_length: int = QA_MAX_LENGTH, stride: int = QA_STRIDE) -> list[dict]:
    """Question first, context truncated "only_second" into overlapping windows, one example per window."""
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    examples = []
    for row in rows:
        question = row["question"].strip()
        # the QA head's rule: a question leaving room for <= stride context tokens overlaps by half the room
        room = max_length - n_special - len(tokenizer(question, add_special_tokens=False)["input_ids"])
        if room < 1:
            continue  # no context fits beside this question: nothing to learn from it
        enc = tokenizer(question, row["context"], truncation="only_second", max_length=max_length,
                        stride=stride if stride < room else room // 2, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        types = enc.get("token_type_ids")
        start_char = int(row["answer_start"])
        end_char = start_char + len(row["answer_text"])
        for k, ids in enumerate(enc["input_ids"]):
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            start, end = answer_positions(enc["offset_mapping"][k], enc.sequence_ids(k), start_char, end_char,
                                          cls_index)
            examples.append({"input_ids": ids, "token_type_ids": types[k] if types is not None else None,
                             "start_positions": start, "end_positions": end})
    return examples


def train_qa(base_model: str, out_dir: str, train: list[dict], eval: list[dict], epochs: float = 2,
             lr: float = 5e-5, batch_size: int = 16, max_length: int = QA_MAX_LENGTH, stride: int = QA_STRIDE,
             seed: int = 0, progress: bool = True) -> dict:
    """Rows {"context", "question", "answer_start", "answer_text"}. Returns exact_match and f1 on `eval`."""
    model, tokenizer = load_base(AutoModelForQuestionAnswering, base_model)
    window = min(max_length, model_max_length(model, tokenizer))  # the QA head caps it the same way
    examples = qa_examples(tokenizer, train, window, stride)
    return _fit_save_evaluate(model, tokenizer, examples, out_dir,
                              lambda: evaluate_qa(out_dir, eval, max_length, stride), len(train),
                              epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                              desc="qa")


def evaluate_qa(out_dir: str, rows: Sequence[dict], max_length: int = QA_MAX_LENGTH, stride: int = QA_STRIDE) -> dict:
    """Answers from the project's QA head (same windows and span decoding as corpus runs)."""
    docs = [Doc(str(i), r["context"], {"question": r["question"]}) for i, r in enumerate(rows)]
    params = {"question_column": "question", "max_seq_len": max_length, "doc_stride": stride}
    outs = predict("training-eval", "qa", out_dir, docs, params=params)
    pred = [out[0]["answer"] if out else None for out in outs]
    gold = [r["answer_text"] for r in rows]
    n = max(len(rows), 1)
    return {"exact_match": sum(map(exact_match, gold, pred)) / n, "f1": sum(map(token_f1, gold, pred)) / n,
            "n": len(rows)}
