"""Inference backends besides PyTorch: ONNX Runtime for encoder heads, CTranslate2 for translation.

A backend is a drop-in replacement of a head's `model`: the head keeps its tokenizer, its encode
and decode and the engine's token-budget batching; only the model call changes. The torch model
stays loaded beside it (its config, device and parameters answer what heads ask of `model`), and
is the reference of the parity probe every exported model must pass before use.

Exports and conversions are cached by a key of everything that changes the artifact (task, source,
resolved revision, weights sha256, precision, backend and exporter versions), in
`$TASKHEADS_CACHE` (default `~/.cache/taskheads`): built in a temporary folder beside it, then
renamed into place, so several workers that race on a first use never read a half-written model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

BACKENDS = ("torch", "onnxruntime", "ctranslate2", "auto")
ENCODER_TASKS = ("classification", "ner", "qa", "multiple_choice", "embedding")
SEQ2SEQ_TASKS = ("translation",)
# backend -> (pip extra, modules it needs)
EXTRAS = {"onnxruntime": ("onnx", ("onnxruntime", "onnx", "onnxscript")), "ctranslate2": ("ct2", ("ctranslate2",))}
# precisions (`dtype`) each backend runs
PRECISIONS = {"torch": ("float32", "bfloat16", "float16", "int8"), "onnxruntime": ("float32", "int8"),
              "ctranslate2": ("float32", "bfloat16", "float16", "int8")}
FORMAT_VERSION = "1"  # bump when an export changes shape: old cache entries are then never read


class BackendError(Exception):
    """A backend cannot serve this head (conversion failed, or the converted model drifts from torch)."""


def tasks_for(backend: str) -> tuple[str, ...]:
    return {"onnxruntime": ENCODER_TASKS, "ctranslate2": SEQ2SEQ_TASKS}.get(backend, ())


def installed(backend: str) -> bool:
    if backend == "torch":
        return True
    return all(importlib.util.find_spec(m) is not None for m in EXTRAS[backend][1])


def resolve_backend(task: str, backend: str, dtype: str = "float32") -> str:
    """The backend that runs: `auto` is the fastest installed one for the task and precision
    (measured in benchmarks/README.md: ONNX Runtime for encoders, CTranslate2 for translation)."""
    if backend != "auto":
        return backend
    for candidate in ("onnxruntime", "ctranslate2"):
        if task in tasks_for(candidate) and dtype in PRECISIONS[candidate] and installed(candidate):
            return candidate
    return "torch"


def check_backend(task: str, backend: Any, dtype: str) -> str | None:
    """Why this backend cannot serve the head (one line, naming the extra to install), or None."""
    if backend not in BACKENDS:
        return f"must be one of {', '.join(BACKENDS)}, not {backend!r}"
    resolved = resolve_backend(task, backend, dtype)
    if resolved == "torch":
        return None
    if task not in tasks_for(resolved):
        return f"{resolved} runs {', '.join(tasks_for(resolved))} heads, not {task}"
    if dtype not in PRECISIONS[resolved]:
        return f"{resolved} runs dtype {' / '.join(PRECISIONS[resolved])}, not {dtype!r}"
    if not installed(resolved):
        extra = EXTRAS[resolved][0]
        return f"{resolved} is not installed: pip install 'taskheads[{extra}]'"
    return None


def tagged_dtype(dtype: str, backend: str) -> str:
    """The precision as lineage records it (`models.dtype`): `int8@onnxruntime`; plain for torch."""
    return dtype if backend == "torch" else f"{dtype}@{backend}"


def split_dtype(recorded: str) -> tuple[str, str]:
    """(dtype, backend) of a recorded `models.dtype`."""
    dtype, _, backend = (recorded or "float32").partition("@")
    return dtype, backend or "torch"


# --- cache ------------------------------------------------------------------------------------
def cache_root() -> Path:
    root = os.environ.get("TASKHEADS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taskheads")
    return Path(root)


def weights_digest(source: str, net: Any) -> str:
    """What identifies the weights: the files' sha256 for a folder, the resolved commit for a hub id."""
    folder = Path(source)
    h = hashlib.sha256()
    if folder.is_dir():
        for p in sorted(list(folder.glob("*.safetensors")) + [folder / "config.json"]):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    commit = getattr(getattr(net, "config", None), "_commit_hash", None)
    if commit:
        return f"{source}@{commit}"
    for name, tensor in sorted(net.state_dict().items()):  # no commit known: hash the tensors themselves
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def cache_key(backend: str, **parts: Any) -> str:
    return hashlib.sha256(json.dumps([backend, FORMAT_VERSION, parts], sort_keys=True, default=str)
                          .encode()).hexdigest()[:24]


def cached_build(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The folder `<cache>/<kind>/<key>`, built by `build(tmp)` on first use.

    `build` writes into a fresh temporary folder in the same parent, which is then renamed into
    place: a reader sees a complete folder or none. When another process wins the race, its folder
    is kept and ours discarded (the artifacts are equivalent)."""
    final = cache_root() / kind / key
    if (final / "complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / "complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another worker renamed first (the target exists and is not empty)
            if not (final / "complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def wrap(head: Any, backend: str, dtype: str, source: str) -> Any:
    """Replace `head.model` by the backend's model (exported or converted on first use, then probed)."""
    if backend == "onnxruntime":
        from .onnx import OrtModel

        head.model = OrtModel.for_head(head, dtype, source)
    elif backend == "ctranslate2":
        from .ct2 import Ct2Model

        head.model = Ct2Model.for_head(head, dtype, source)
    head.backend = backend
    return head
