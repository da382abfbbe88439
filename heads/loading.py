"""Load a head's model and tokenizer safely (safetensors only, no remote code by default)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .base import Head
from .registry import head_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_head(name: str, task: str, model: str, revision: str | None = None,
              params: Mapping[str, Any] | None = None, dtype: str = "float32", device: str = "auto",
              trust_remote_code: bool = False) -> Head:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cls = head_class(task)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and not Path(model).exists():
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(model, use_fast=True, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"model {model!r} has no fast tokenizer; taskheads needs offsets from a fast tokenizer")
    net = cls.model_class.from_pretrained(model, use_safetensors=True, dtype=DTYPES[dtype], **kwargs)
    net.to(resolve_device(device)).eval()
    torch.set_num_threads(int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads())))
    return cls(name, net, tokenizer, params)
