"""The one training loop: AdamW, linear warmup then decay, fixed seed, length-bucketed batches.

Examples are dicts of token lists (`input_ids`, optional `token_type_ids`) plus their targets
(`labels` as an int or a per-token list, or `start_positions`/`end_positions`). Batches are drawn
from pools of similar length so CPU time is not spent on padding, while the order of the batches
is still shuffled every epoch.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100  # what HF token-classification losses skip
POOL_BATCHES = 50  # batches per length-sorted pool: a little shuffling, little padding


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort pools of `POOL_BATCHES` batches by length, cut into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * POOL_BATCHES
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lambda i: lengths[i])
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate_examples(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; per-token labels are padded with IGNORE_INDEX."""
    n = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, Any] = {"input_ids": [], "attention_mask": []}
    has_types = examples[0].get("token_type_ids") is not None
    if has_types:
        batch["token_type_ids"] = []
    for e in examples:
        pad = n - len(e["input_ids"])
        batch["input_ids"].append(list(e["input_ids"]) + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        if has_types:
            batch["token_type_ids"].append(list(e["token_type_ids"]) + [0] * pad)
    if "labels" in examples[0]:
        if isinstance(examples[0]["labels"], list):
            batch["labels"] = [list(e["labels"]) + [IGNORE_INDEX] * (n - len(e["labels"])) for e in examples]
        else:
            batch["labels"] = [int(e["labels"]) for e in examples]
    for key in ("start_positions", "end_positions"):
        if key in examples[0]:
            batch[key] = [int(e[key]) for e in examples]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def fit(model, examples: Sequence[dict], pad_id: int, epochs: float, lr: float, batch_size: int,
        seed: int = 0, warmup_ratio: float = 0.1, weight_decay: float = 0.01, progress: bool = True,
        desc: str = "train") -> dict:
    """Train `model` in place; returns steps, final_loss (mean of the last epoch) and train_seconds.

    A fractional `epochs` (e.g. 1.5) runs the first part of an extra epoch's batches.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if not examples:
        raise ValueError("no training examples")
    started = time.perf_counter()
    set_seed(seed)
    rng = random.Random(seed)
    lengths = [len(e["input_ids"]) for e in examples]
    plan: list[list[int]] = []
    full, part = int(epochs), epochs - int(epochs)
    for _ in range(full):
        plan.append(length_batches(lengths, batch_size, rng))
    if part > 0:
        extra = length_batches(lengths, batch_size, rng)
        plan.append(extra[:max(1, round(len(extra) * part))])
    total = sum(len(p) for p in plan)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(total * warmup_ratio), total)
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="batch")
    last_losses: list[float] = []
    for epoch_batches in plan:
        last_losses = []
        for idx in epoch_batches:
            batch = collate_examples([examples[i] for i in idx], pad_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{last_losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"steps": total, "final_loss": sum(last_losses) / max(len(last_losses), 1),
            "train_seconds": round(time.perf_counter() - started, 1)}


def load_base(model_class, base_model: str, **config):
    """A task model on top of the base encoder's weights (the task layer is newly initialised)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from heads.loading import own_load_report

    hf_logging.disable_progress_bar()  # weight loading/saving bars; the training bar is our own
    tokenizer = AutoTokenizer.from_pretrained(base_model, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{base_model}: a fast tokenizer is needed (offsets)")
    with own_load_report():  # "newly initialised weights" is the point here, not a warning (this load only)
        model = model_class.from_pretrained(base_model, use_safetensors=True, **config)
    return model, tokenizer


def save(model, tokenizer, out_dir: str) -> str:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
