"""Load a head's model and tokenizer safely (safetensors only, no remote code by default)."""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch

from core.errors import ModelLoadError, UntrainedHeadError

from .base import Head
from .registry import head_class


TRAINABLE = ("classification", "ner", "qa")  # the tasks flows/train_head fine-tunes


class _LoadReportFilter(logging.Filter):
    """Drops transformers' load-report warnings in threads inside `load_head`, which checks the same
    loading info itself (missing or mismatched weights refuse the head; unexpected ones, e.g. an
    encoder's pooler a token classifier does not use, are harmless). Other threads and code keep
    every transformers warning: nothing is silenced process-wide."""

    active = threading.local()
    # the table of missing/unexpected/mismatched keys, and tied weights absent on both sides
    # (they stay in missing_keys, so the head is refused anyway)
    MESSAGES = ("LOAD REPORT", "This checkpoint seem corrupted")

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.active, "depth", 0):
            return True
        message = record.getMessage()
        return not any(m in message for m in self.MESSAGES)


_REPORT_FILTER = _LoadReportFilter()


@contextmanager
def own_load_report():
    """While our own from_pretrained runs in this thread, its load report is ours to judge."""
    from transformers.utils import logging as hf_logging

    target = hf_logging.get_logger("transformers.modeling_utils")
    if _REPORT_FILTER not in target.filters:
        target.addFilter(_REPORT_FILTER)
    _REPORT_FILTER.active.depth = getattr(_REPORT_FILTER.active, "depth", 0) + 1
    try:
        yield
    finally:
        _REPORT_FILTER.active.depth -= 1


def _short(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_trained(name: str, task: str, model: str, net, info: Mapping[str, Any]) -> None:
    """Refuse a model whose weights transformers had to initialise: missing from the checkpoint
    (a bare encoder under a task head) or of another shape than the config says (e.g. a 3-label
    classifier under a 5-label config). Tied weights present in the checkpoint are not missing."""
    missing = set(info.get("missing_keys") or ())
    mismatched = {k: (tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ()}
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        problems.append(f"missing weights {_short(missing)}")
    if mismatched:
        problems.append("weights of another shape " + _short(f"{k} {a} vs config {b}" for k, (a, b) in
                                                             mismatched.items()))
    way_out = ("fine-tune it with flows/train_head, or choose a fine-tuned model" if task in TRAINABLE
               else "choose a model fine-tuned for it (saved with its task layer)")
    raise UntrainedHeadError(
        f"heads.{name}: {model!r} has no trained {task} weights for {type(net).__name__} "
        f"({'; '.join(problems)}; they would be random): {way_out}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}


def quantize_int8(model):
    """Dynamic int8 quantization of the Linear layers (CPU): weights int8, activations quantized per batch."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("dtype int8 (dynamic quantization) runs on CPU only; use bfloat16 on GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_head(name: str, task: str, model: str, revision: str | None = None,
              params: Mapping[str, Any] | None = None, dtype: str = "float32", device: str = "auto",
              trust_remote_code: bool = False, backend: str = "torch") -> Head:
    """Tokenizer and model of a head; ModelLoadError (UntrainedHeadError when task weights are
    missing) names the head, before any document is processed.

    A `backend` other than torch (heads/backends) loads the torch model in float32 as the
    reference, then replaces it by the exported or converted model that passed the parity probe."""
    from .backends import BackendError, check_backend, resolve_backend, wrap

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars per head would break the run's own bars
    cls = head_class(task)
    if cls.model_class is None:  # a model-free head (e.g. language detection) builds what it needs itself
        return cls(name, None, None, params)
    problem = check_backend(task, backend, dtype)
    if problem:
        raise ModelLoadError(f"heads.{name}.backend: {problem}")
    backend = resolve_backend(task, backend, dtype)
    target = resolve_device(device)
    if dtype == "float16" and not target.startswith("cuda"):
        raise ModelLoadError(f"heads.{name}.dtype: float16 runs on CUDA only (this head runs on {target}); "
                             "use float32, bfloat16 or int8 on CPU")
    load_dtype = dtype if backend == "torch" else "float32"  # the backend applies its own precision
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision and not Path(model).exists():
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, use_fast=True, **kwargs)
        with own_load_report():  # mismatched shapes are reported in `info`, not raised, then refused below
            net, info = cls.model_class.from_pretrained(model, use_safetensors=True, dtype=DTYPES[load_dtype],
                                                        output_loading_info=True, ignore_mismatched_sizes=True,
                                                        **kwargs)
    except Exception as exc:  # offline without a cached copy, wrong id, no safetensors, wrong head type ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"heads.{name}.model: cannot load {model!r} as {cls.model_class.__name__}: "
                             f"{reason}") from exc
    check_trained(name, task, model, net, info)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"heads.{name}.model: {model!r} has no fast tokenizer (offsets need one)")
    net.to(target).eval()
    if dtype == "int8" and backend == "torch":
        net = quantize_int8(net)
    torch.set_num_threads(int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads())))
    head = cls(name, net, tokenizer, params)
    head.backend = backend
    if backend != "torch":
        try:
            wrap(head, backend, dtype, model)
        except BackendError as exc:
            raise ModelLoadError(f"heads.{name}.backend: {exc}") from exc
    return head


class _ResidentHeads:
    """Heads loaded in this process, least recently used first; at most `limit` kept (0: no limit).

    Prefect tasks of one worker share it. A head is used by one thread at a time (fast tokenizers
    refuse concurrent use); different heads run concurrently.
    """

    def __init__(self) -> None:
        self.heads: OrderedDict[str, tuple[Head, threading.Lock]] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}

    @staticmethod
    def key(cfg) -> str:
        import json

        return json.dumps([cfg.name, cfg.task, cfg.model, cfg.revision, dict(cfg.params), cfg.dtype, cfg.device,
                           cfg.trust_remote_code, getattr(cfg, "backend", "torch")], sort_keys=True, default=str)

    def get(self, cfg, limit: int = 0) -> tuple[Head, threading.Lock]:
        key = self.key(cfg)
        with self.lock:
            load_lock = self.loading.setdefault(key, threading.Lock())
        with load_lock:  # one thread loads a given head; others wait for it
            with self.lock:
                if key in self.heads:
                    self.heads.move_to_end(key)
                    return self.heads[key]
            entry = (load_head(cfg.name, cfg.task, cfg.model, revision=cfg.revision, params=cfg.params,
                               dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                               backend=getattr(cfg, "backend", "torch")),
                     threading.Lock())
            with self.lock:
                self.heads[key] = entry
                while limit and len(self.heads) > limit:
                    self.heads.popitem(last=False)  # a unit still running keeps its own reference
            if limit:
                gc.collect()
            return entry

    def names(self) -> list[str]:
        return [h.name for h, _ in self.heads.values()]


RESIDENT = _ResidentHeads()


def cached_head(cfg, max_resident_models: int = 0) -> Head:
    """Load a head once per process (Prefect tasks of one worker share it)."""
    return RESIDENT.get(cfg, max_resident_models)[0]


@contextmanager
def using_head(cfg, max_resident_models: int = 0):
    """The loaded head, held exclusively for the duration of the block."""
    head, lock = RESIDENT.get(cfg, max_resident_models)
    with lock:
        yield head


def model_identity(cfg, head: Head | None = None) -> dict:
    """Lineage of a head: what exactly produces its rows (source, revision, files, params), computed
    from the model's files without loading it (heads.identity); with a loaded `head`, from its params."""
    from .identity import file_identity

    return file_identity(cfg, params=head.p if head is not None else None)
