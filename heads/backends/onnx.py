"""ONNX Runtime for the encoder heads (classification, NER, QA, multiple choice, embedding).

Export (once per cache key, see `heads.backends`): the legacy TorchScript exporter (`dynamo=False`)
on the model switched to eager attention, dynamic batch and sequence axes, then ONNX Runtime's
transformer optimizer (fused embedding + LayerNorm, attention, bias + GELU, skip + LayerNorm: the
fusions it finds only in that graph shape); `int8` is dynamic quantization of the fused graph
(`quantize_dynamic`: int8 weights, activations quantized per batch). The session gets the same
padded batches as torch; outputs come back as torch tensors on the head's device, so decode code
is shared. Before use, the exported model must match the torch model on fixed probe texts
(float32: max |Δ| ≤ 1e-4; int8: relative error ≤ INT8_TOLERANCE), or it is refused in one line.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from . import BackendError, cache_key, cached_build, weights_digest

OUTPUTS = {"classification": ("logits",), "ner": ("logits",), "qa": ("start_logits", "end_logits"),
           "multiple_choice": ("logits",), "embedding": ("last_hidden_state",)}
FLOAT32_TOLERANCE = 1e-4  # max |Δ| of any output against torch on the probe texts
INT8_TOLERANCE = 0.3  # ||Δ|| / ||torch output|| on the probe texts: int8 noise measured 0.02-0.15, garbage ~1
QUANTIZE = {"per_channel": True, "reduce_range": True}  # 7-bit weights: no u8s8 saturation on AVX2 without VNNI (measured)
OPSET = 17

PROBE_TEXTS = [
    "The government said on Monday that shares in the company rose sharply after the report.",
    "Short.",
    "Analysts in London expected further gains as the election neared, while technology firms reported "
    "strong demand for chips and the minister promised new funding for sports clubs across the country.",
    "Ünïcode tëxt — 42% of 3.14 € and an emoji 🙂, \"quotes\" (brackets) & the end",
]
PROBE_PAIRS = ["Who said it?", "What rose?", "Where were the analysts?", "What is it?"]


class _Export(torch.nn.Module):
    """The model as a function of tensors to a tuple of tensors (what the exporter traces)."""

    def __init__(self, model: Any, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if self.task == "multiple_choice":  # one pair per row: [n, seq] -> [n, 1, seq] -> logits [n]
            kw = {k: v.unsqueeze(1) for k, v in kw.items()}
            return (self.model(**kw).logits.reshape(-1),)
        out = self.model(**kw)
        return tuple(getattr(out, name) for name in OUTPUTS[self.task])


def probe_batch(tokenizer: Any, task: str, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded probe inputs as the heads collate them (pairs for QA and multiple choice)."""
    pairs = PROBE_PAIRS if task in ("qa", "multiple_choice") else None
    enc = tokenizer(PROBE_TEXTS, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _model_inputs(task: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.unsqueeze(1) for k, v in batch.items()} if task == "multiple_choice" else batch


def export(net: Any, tokenizer: Any, task: str, dtype: str, folder: Path, max_length: int) -> None:
    """Write `model.onnx` (fused; int8-quantized for dtype int8) into `folder`."""
    from onnxruntime.transformers.optimizer import optimize_model

    batch = probe_batch(tokenizer, task, min(max_length, 32))
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]  # forward's order
    outputs = list(OUTPUTS[task]) if task != "multiple_choice" else ["logits"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    for o in outputs:
        axes[o] = {0: "batch"} if task in ("classification", "multiple_choice") else {0: "batch", 1: "sequence"}
    previous = getattr(net.config, "_attn_implementation", None)
    raw = folder / "raw.onnx"
    try:
        net.set_attn_implementation("eager")  # the optimizer fuses the eager attention pattern only
        wrapper = _Export(net, task).eval()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(batch[n].cpu() for n in names), str(raw), dynamo=False,
                              opset_version=OPSET, input_names=names, output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        if previous:
            net.set_attn_implementation(previous)
    cfg = net.config
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = optimize_model(str(raw), model_type="bert", num_heads=int(getattr(cfg, "num_attention_heads", 0)),
                                   hidden_size=int(getattr(cfg, "hidden_size", 0)))
        fused.save_model_to_file(str(folder / "fused.onnx"))
        fused_path = folder / "fused.onnx"
    except Exception:  # an architecture the optimizer does not know: the plain graph is still exact
        fused_path = raw
    if dtype == "int8":
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # the fused ops (com.microsoft domain) defeat shape inference: their outputs are float32
        quantize_dynamic(str(fused_path), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT}, **QUANTIZE)
    else:
        os.replace(fused_path, folder / "model.onnx")
    for leftover in ("raw.onnx", "fused.onnx"):
        if (folder / leftover).exists():
            (folder / leftover).unlink()


def session(path: Path, device: torch.device) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads()))
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        # Without an arena every node's output is a fresh allocation, and those of a long batch are fresh
        # mmaps that fault in on every run: measured on 512-token BBC batches at the default budget, int8
        # ran 1.7x and float32 1.4x faster with the arena, and peaked lower (327 vs 401 MB). The arena
        # keeps the largest batch's peak, which the token budget bounds; grown exactly as asked, not by
        # powers of two, it keeps 1.0 GB after a 16,384-token batch whose peak without it is also 1.0 GB.
        _share_exact_arena(ort)
        so.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), so, providers=providers)


@functools.cache
def _share_exact_arena(ort: Any) -> None:
    """One CPU arena for the process's sessions, extended by what is asked (kSameAsRequested)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # no cap, same-as-requested


class OrtModel:
    """Callable like the torch model (`model(**batch)` -> outputs with `.logits` ...), run by ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, sess: Any, torch_model: Any, task: str, folder: Path):
        self.session, self.torch_model, self.task, self.folder = sess, torch_model, task, folder
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]

    # what heads and lineage read of a model
    @property
    def config(self):
        return self.torch_model.config

    @property
    def name_or_path(self):
        return getattr(self.torch_model, "name_or_path", "")

    def parameters(self):
        return self.torch_model.parameters()

    def eval(self):
        return self

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        device = batch["input_ids"].device
        shape = batch["input_ids"].shape
        feed = {}
        for name in self.input_names:
            t = batch[name]
            if self.task == "multiple_choice":
                t = t.reshape(-1, t.shape[-1])
            feed[name] = t.detach().to("cpu", torch.int64).numpy()
        outs = self.session.run(self.output_names, feed)
        tensors = [torch.from_numpy(o).to(device) for o in outs]
        if self.task == "multiple_choice":
            return SimpleNamespace(logits=tensors[0].reshape(shape[0], shape[1]))
        return SimpleNamespace(**dict(zip(OUTPUTS[self.task], tensors)))

    @classmethod
    def for_head(cls, head: Any, dtype: str, source: str) -> "OrtModel":
        import onnxruntime
        import transformers

        net, task = head.model, head.task
        max_length = head.max_length()
        key = cache_key("onnxruntime", task=task, source=source, weights=weights_digest(source, net), dtype=dtype,
                        model_class=type(net).__name__, torch=torch.__version__, ort=onnxruntime.__version__,
                        transformers=transformers.__version__)
        try:
            folder = cached_build("onnx", key, lambda tmp: export(net, head.tokenizer, task, dtype, tmp, max_length))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"cannot export to ONNX: {first}") from exc
        device = next(net.parameters()).device
        try:
            model = cls(session(folder / "model.onnx", device), net, task, folder)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"cached ONNX model {folder} does not load ({first}); delete it to export "
                               "again") from exc
        model.probe(head.tokenizer, dtype, max_length)
        return model

    def probe(self, tokenizer: Any, dtype: str, max_length: int) -> None:
        """Refuse the exported model when it drifts from the torch model on the probe texts."""
        batch = {k: v.to(next(self.torch_model.parameters()).device)
                 for k, v in probe_batch(tokenizer, self.task, min(max_length, 128)).items()}
        with torch.inference_mode():
            ref = self.torch_model(**_model_inputs(self.task, batch))
        got = self(**_model_inputs(self.task, batch))
        err = drift(self.task, ref, got, batch["attention_mask"])
        ok = err["max_abs"] <= FLOAT32_TOLERANCE if dtype == "float32" else err["relative"] <= INT8_TOLERANCE
        if not ok:
            limit = (f"max |Δ| {err['max_abs']:.2g} > {FLOAT32_TOLERANCE:g}" if dtype == "float32"
                     else f"relative error {err['relative']:.3f} > {INT8_TOLERANCE:g}")
            raise BackendError(f"onnxruntime {dtype} model {self.folder} drifts from the torch model on the "
                               f"probe texts ({limit}): delete that folder to export again, or use "
                               "backend = \"torch\"")


def drift(task: str, ref: Any, got: Any, mask: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative (L2) difference of the outputs, padded positions excluded."""
    names = OUTPUTS[task]
    diffs, refs = [], []
    m = mask.bool().cpu().numpy()
    for name in names:
        a = getattr(ref, name).float().cpu().numpy()
        b = getattr(got, name).float().cpu().numpy()
        if a.shape != b.shape:
            return {"max_abs": float("inf"), "relative": float("inf")}
        if a.ndim >= 2 and a.shape[:2] == m.shape:  # token-level outputs: real tokens only
            a, b = a[m], b[m]
        diffs.append((a - b).ravel())
        refs.append(a.ravel())
    d, r = np.concatenate(diffs), np.concatenate(refs)
    if not np.all(np.isfinite(d)):
        return {"max_abs": float("inf"), "relative": float("inf")}
    return {"max_abs": float(np.abs(d).max()), "relative": float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-12))}

