"""GPU readiness without a GPU: a device-recording fake, float16, batch_tokens = "auto", and the torch
translation path that drops finished rows. Tests that need CUDA run on it when one is present."""
from __future__ import annotations

import traceback
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from heads.base import Doc, trim_generated
from heads.engine import DEFAULT_TOKEN_BUDGET, auto_token_budget, pipe
from heads.loading import ModelLoadError, load_head
from taskheads.tiny_models import build_bert, build_causal_lm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TEXTS = ["Tony Blair met Microsoft in London on Monday. The [MASK] rose.", "short [MASK]",
         "the government said on monday that shares in the company rose sharply " * 8]
DOCS = [Doc(str(i), t) for i, t in enumerate(TEXTS)]
FAKE = torch.device("cuda")


class _Tags:
    """Tensors by identity (a WeakSet compares tensors with ==, elementwise)."""

    def __init__(self):
        self.refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        r = self.refs.get(id(t))
        return r is not None and r() is t


class FakeDevice(TorchFunctionMode):
    """A second device simulated on CPU. Tensors sent to "cuda" (kept on CPU) are tagged and report
    `device == cuda`; an op that mixes a tagged tensor with an untagged one of one or more dimensions
    (what fails on a real GPU) is recorded with the line of project code that caused it."""

    def __init__(self):
        super().__init__()
        self.tagged = _Tags()
        self.mixed: list[str] = []

    def tag(self, obj):
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self.tagged.add(t)
        return obj

    @staticmethod
    def _is_cuda(d) -> bool:
        return (isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, str) and d.startswith("cuda"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if func == torch.Tensor.device.__get__:  # a new method-wrapper per access: == not is
            return FAKE if args[0] in self.tagged else torch.device("cpu")
        if func == torch.Tensor.is_cuda.__get__:
            return args[0] in self.tagged
        if name == "cuda":
            return self.tag(args[0])
        to_device = leave = False
        if self._is_cuda(kwargs.get("device")):
            kwargs["device"], to_device = "cpu", True
        elif kwargs.get("device") is not None:
            leave = True
        if name == "to":
            new_args = []
            for a in args[1:]:
                if self._is_cuda(a):
                    a, to_device = "cpu", True
                elif isinstance(a, (str, torch.device)):
                    leave = True
                new_args.append(a)
            args = (args[0], *new_args)
        if name == "cpu":
            leave = True
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t in self.tagged for t in tensors]
        if any(on) and not all(on) and not to_device and not leave:
            strays = [t for t, o in zip(tensors, on) if not o and t.dim() > 0]
            if strays:
                frames = [f for f in traceback.extract_stack()[:-1] if "/heads/" in f.filename]
                where = f"{frames[-1].filename.split('/heads/')[-1]}:{frames[-1].lineno}" if frames else "library"
                self.mixed.append(f"{name} at {where}: {tuple(strays[0].shape)}")
        out = func(*args, **kwargs)
        if to_device or (any(on) and not leave):
            self.tag(out)
        return out


def _plain(obj):
    """Rows with numpy vectors as lists, so == compares them."""
    return tree_map(lambda x: x.tolist() if isinstance(x, np.ndarray) else x, obj)


def _on_fake_device(head):
    mode = FakeDevice()
    model = getattr(head.model, "torch_model", head.model)
    for t in list(model.parameters()) + list(model.buffers()):
        mode.tagged.add(t)
    return mode


@pytest.fixture(scope="module")
def more_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-models")
    return {"masked_lm": str(build_bert(root / "mlm", "masked_lm", max_len=64, seed=1)),
            "multiple_choice": str(build_bert(root / "mc", "multiple_choice", max_len=64, seed=6)),
            "causal_lm": build_causal_lm(root / "clm", "gpt2", max_len=64)}


CASES = [("classification", {}), ("ner", {}), ("qa", {"questions": ["Who met?"]}),
         ("multiple_choice", {"choices": ["a", "b c"]}), ("embedding", {}), ("masked_lm", {"mode": "fill_mask"}),
         ("masked_lm", {"mode": "pseudo_perplexity"}), ("causal_lm", {"mode": "perplexity"}),
         ("causal_lm", {"mode": "generate", "prompt": "Summary: {text}", "max_new_tokens": 4}), ("translation", {"max_new_tokens": 6})]


@pytest.mark.parametrize("task,params", CASES, ids=[f"{t}-{p.get('mode', '')}" for t, p in CASES])
def test_every_tensor_is_created_on_the_heads_device(tiny_models, more_models, task, params):
    path = {**tiny_models, **more_models, "embedding": tiny_models["classification"]}[task]
    head = load_head("h", task, path, params=params, device="cpu")
    reference = pipe(head, DOCS, token_budget=256)
    mode = _on_fake_device(head)
    with mode:
        assert head.device == FAKE  # the head sees the fake device through its parameters
        results = pipe(head, DOCS, token_budget=256)
    assert mode.mixed == []
    assert _plain([r.rows for r in results]) == _plain([r.rows for r in reference])


def test_the_fake_catches_a_tensor_that_assumes_cpu(tiny_models):
    """The fake itself: a head creating a mask without naming the device is caught."""
    head = load_head("h", "classification", tiny_models["classification"], device="cpu")
    original = head.collate

    def careless(feats, left=False):
        batch = original(feats, left)
        batch["input_ids"] = torch.tensor(batch["input_ids"].tolist())  # rebuilt without naming the device
        return batch

    head.collate = careless
    mode = _on_fake_device(head)
    with mode:
        pipe(head, DOCS[:1])
    assert mode.mixed and mode.mixed[0].startswith("embedding"), mode.mixed


@pytest.mark.parametrize("device", DEVICES)
def test_float16_runs_on_cuda_only(tiny_models, device):
    if device == "cpu":
        with pytest.raises(ModelLoadError) as err:
            load_head("topic", "classification", tiny_models["classification"], dtype="float16", device="cpu")
        assert str(err.value) == ("heads.topic.dtype: float16 runs on CUDA only (this head runs on cpu); use "
                                  "float32, bfloat16 or int8 on CPU")
    else:
        head = load_head("topic", "classification", tiny_models["classification"], dtype="float16", device=device)
        ref = load_head("topic", "classification", tiny_models["classification"], device=device)
        a, b = pipe(ref, DOCS), pipe(head, DOCS)
        assert [x.rows[0]["label"] for x in a] == [x.rows[0]["label"] for x in b]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_tokens_auto(tiny_models, device, monkeypatch):
    head = load_head("topic", "classification", tiny_models["classification"], device=device)
    if device == "cpu":
        assert auto_token_budget(head) == DEFAULT_TOKEN_BUDGET == 4096
        stats: dict = {}
        pipe(head, DOCS, token_budget="auto", stats=stats)
        assert stats["final_budget"] == 4096
    else:
        assert 8192 <= auto_token_budget(head) <= 131072
    # sized from the device's free memory: more memory, larger budget, within bounds
    monkeypatch.setattr(type(head), "device", property(lambda self: torch.device("cuda")))
    sizes = []
    for free in (1 << 20, 1 << 26, 1 << 40):  # the tiny model needs little per token
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, f=free: (f, f))
        sizes.append(auto_token_budget(head))
    assert sizes[0] == 8192 and sizes[0] < sizes[1] < sizes[2] == 131072


@pytest.mark.parametrize("device", DEVICES)
def test_translation_rows_leave_the_batch_and_equal_generate_alone(tiny_models, device):
    head = load_head("mt", "translation", tiny_models["translation"], params={"max_new_tokens": 24}, device=device)
    with torch.no_grad():  # varied output lengths: eos likelier than in the random model (its eos logit
        head.model.final_logits_bias[0, sorted(head.eos_ids)[0]] = 6.0  # trails the top one by 6.5-8)
    docs = [Doc(str(i), " ".join(["word"] * (1 + (i * 7) % 30)) + f" {i}") for i in range(24)]
    rows_seen: list[int] = []
    hook = head.model.model.decoder.register_forward_pre_hook(
        lambda m, a, kw: rows_seen.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    results = pipe(head, docs, token_budget=4096)
    hook.remove()
    alone = []
    for d in docs:
        outs = []
        for f in head.encode(d):
            with torch.inference_mode():
                row = head.model.generate(torch.tensor([f.input_ids], device=device), max_new_tokens=24,
                                          num_beams=1, do_sample=False)[0].tolist()
            outs.append(trim_generated(row, head.eos_ids))
        alone.append(head.decode(d, head.encode(d), outs))
    assert [r.rows for r in results] == alone
    assert rows_seen[0] == len(docs)  # one batch (a generation head fills the budget) ...
    assert len(set(rows_seen)) > 2  # ... that shrank as rows finished
    assert sum(rows_seen) < len(docs) * len(rows_seen)


def test_translation_with_a_rule_that_is_not_row_local_uses_generate(tiny_models):
    head = load_head("mt", "translation", tiny_models["translation"], params={"max_new_tokens": 12})
    head.model.generation_config.encoder_no_repeat_ngram_size = 2  # depends on the encoder input of each row
    from heads.translation import shrinking_greedy

    batch = head.collate(head.encode(DOCS[0]))
    assert shrinking_greedy(head.model, batch, 12, head.eos_ids) is None
    docs = DOCS[:2]
    expected = []
    for d in docs:
        outs = []
        for f in head.encode(d):
            with torch.inference_mode():
                row = head.model.generate(torch.tensor([f.input_ids]), max_new_tokens=12, num_beams=1)[0].tolist()
            outs.append(trim_generated(row, head.eos_ids))
        expected.append(head.decode(d, head.encode(d), outs))
    assert [r.rows for r in pipe(head, docs)] == expected
