"""CausalLMHead: perplexity parity with HF loss (whole document and sliding windows), padding parity of
batched generate(), reproducible sampling, over-long prompts, parameter checks."""
from __future__ import annotations

import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from heads.base import Doc, Feature
from heads.base import trim_generated
from heads.causal_lm import CausalLMHead, combine_windows, perplexity_windows
from heads.engine import pipe
from taskheads.tiny_models import build_causal_lm

MAX_LEN = 128
PROMPT = "Document: {text}\nContinue:"




@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; one avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("causal_lm")
    return {"llama": build_causal_lm(root / "llama", "llama", max_len=MAX_LEN, seed=0),
            "gpt2": build_causal_lm(root / "gpt2", "gpt2", max_len=MAX_LEN, seed=1)}


def load(path: str, eos_bias: float = 0.0, max_len: int | None = None, **params) -> CausalLMHead:
    """Load like heads.loading does (from the folder), then build the head directly."""
    tok = AutoTokenizer.from_pretrained(path, **({"model_max_length": max_len} if max_len else {}))
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    if eos_bias:  # a random model rarely says eos; a bias on its logit makes some outputs end early
        lm_head = model.get_output_embeddings()
        with torch.no_grad():
            bias = torch.zeros(lm_head.out_features)
            bias[model.config.eos_token_id] = eos_bias
            lm_head.bias = torch.nn.Parameter(bias)
    return CausalLMHead("lm", model, tok, params)


def doc_ids(head: CausalLMHead, text: str) -> list[int]:
    """The documented input: [bos] + the text's tokens, no [SEP] (the BERT tokenizer adds specials)."""
    return [head.tokenizer.cls_token_id] + head.tokenizer(text, add_special_tokens=False)["input_ids"]


WORDS = ("the quick brown fox jumps over a lazy dog near the river while seven musicians play "
         "old songs about mountains weather paper cities and data models in the evening").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def spy_forward(head, monkeypatch) -> list[tuple[list[Feature], list]]:
    calls: list[tuple[list[Feature], list]] = []
    real_forward = head.forward

    def spy(feats):
        outs = real_forward(feats)
        calls.append((list(feats), outs))
        return outs

    monkeypatch.setattr(head, "forward", spy)
    return calls


def mixed_batches(calls) -> int:
    return sum(1 for fs, _ in calls if len({f.length for f in fs}) > 1 and len({f.doc_index for f in fs}) > 1)


# --- 1. perplexity ------------------------------------------------------------------------------

SHORT = ["Hello", "Hello world.", "The fox jumps {over} the dog, twice!", "Café naïve 東京 🎉 résumé",
         make_text(8, 1), make_text(20, 2), make_text(45, 3), make_text(90, 4)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_of_short_documents_matches_hf_loss(models, monkeypatch, arch):
    head = load(models[arch])
    assert (head.task, head.table, head.window, head.bos_prefix) == ("causal_lm", "lm_scores", 128, [101])
    calls = spy_forward(head, monkeypatch)
    results = pipe(head, [Doc(f"d{k}", t) for k, t in enumerate(SHORT)], token_budget=200)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert mixed_batches(calls) >= 1, [[f.length for f in fs] for fs, _ in calls]
    for r in results:
        ids = doc_ids(head, r.doc.text)
        assert ids[-1] != head.tokenizer.sep_token_id and len(ids) < 128
        with torch.no_grad():
            x = torch.tensor([ids])
            loss = head.model(input_ids=x, labels=x).loss.item()
        [row] = r.rows
        assert set(row) == {"perplexity", "n_tokens", "mean_nll", "n_windows"}
        assert row["n_tokens"] == len(ids) - 1 and row["n_windows"] == 1
        assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert row["mean_nll"] == pytest.approx(loss, rel=1e-4)
    assert results[0].rows[0]["n_tokens"] == 1  # "Hello": one word predicted from bos
    assert len({round(r.rows[0]["perplexity"], 3) for r in results}) == len(results)


def reference_sliding_window(model, ids: list[int], window: int, stride: int) -> tuple[float, int, int]:
    """The HF perplexity recipe, one window at a time, counting exactly the tokens the shifted loss averages."""
    nll_sum, n_scored, n_windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss.item()
        k = int((labels[:, 1:] != -100).sum())  # the loss shifts labels: position 0 predicts nothing
        nll_sum += loss * k
        n_scored += k
        n_windows += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_scored), n_scored, n_windows


@pytest.mark.parametrize("arch, stride", [("llama", 0), ("llama", 7), ("gpt2", 0), ("gpt2", 31)])
def test_sliding_window_perplexity_matches_hf_recipe(models, monkeypatch, arch, stride):
    head = load(models[arch], max_len=32, stride=stride)
    assert head.window == 32 and head.stride == (stride or 16)
    long_text = make_text(150, 7)
    docs = [Doc("long", long_text), Doc("mid", make_text(40, 8)), Doc("short", "A few words here.")]
    calls = spy_forward(head, monkeypatch)
    results = pipe(head, docs, token_budget=80)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert mixed_batches(calls) >= 1
    for r in results:
        ids = doc_ids(head, r.doc.text)
        ppl, n_scored, n_windows = reference_sliding_window(head.model, ids, 32, stride or 16)
        [row] = r.rows
        assert (row["n_tokens"], row["n_windows"]) == (n_scored, n_windows) and n_scored == len(ids) - 1
        assert row["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert len(doc_ids(head, long_text)) > 150 and results[0].rows[0]["n_windows"] > 4
    assert results[2].rows[0]["n_windows"] == 1


def test_short_and_empty_documents_fail_with_a_reason(models):
    head = load(models["llama"])
    results = pipe(head, [Doc("e", " \n "), Doc("c", "\x00\x01"), Doc("ok", "Fine.")])
    assert (results[0].error, results[0].stage) == ("DocumentError: empty text", "encode")
    assert results[1].error == ("DocumentError: perplexity needs at least 2 tokens (the first token has no "
                                "prediction); the document has 1") and results[1].stage == "encode"
    assert results[2].error is None and results[2].rows[0]["n_tokens"] == 2  # "fine" and "."


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), window=st.integers(2, 40), data=st.data())
def test_windows_score_every_token_once(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    plan = perplexity_windows(n, window, stride)
    scored = [b + p for b, e, s in plan for p in range(s, e - b)]
    assert scored == list(range(1, n))
    assert all(0 < e - b <= window and 1 <= s for b, e, s in plan) and plan[-1][1] == n
    assert [b for b, _, _ in plan] == list(range(0, stride * len(plan), stride))


def test_combine_windows_and_errors():
    row = combine_windows([np.array([1.0, 2.0]), np.array([3.0])])
    assert row == {"perplexity": pytest.approx(math.exp(2.0)), "n_tokens": 3, "mean_nll": 2.0, "n_windows": 2}
    assert combine_windows([np.array([1e6])])["perplexity"] == math.inf
    with pytest.raises(ValueError, match="stride"):
        perplexity_windows(10, 8, 8)


# --- 2. generation ------------------------------------------------------------------------------

GEN_LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 90]
MAX_NEW = 12
EOS = 102


def reference_generate(head: CausalLMHead, ids: list[int], max_new_tokens: int) -> list[int]:
    """generate() on one prompt alone: batch of one, no padding; it stops at eos, so nothing to trim."""
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = head.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                  do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=EOS)
    return out[0, len(ids):].tolist()


def gen_docs() -> list[Doc]:
    docs = [Doc(f"g{k}", make_text(n, seed=10 + k)) for k, n in enumerate(GEN_LENGTHS)]
    docs.append(Doc("braces", "a {text} b {0} {} }{ c"))
    return docs


@pytest.mark.parametrize("arch, eos_bias", [("llama", 3.0), ("gpt2", 3.0)])
def test_batched_generation_matches_generation_alone(models, monkeypatch, arch, eos_bias):
    head = load(models[arch], eos_bias=eos_bias, mode="generate", prompt=PROMPT, max_new_tokens=MAX_NEW)
    assert head.table == "generations"
    docs = gen_docs()
    calls = spy_forward(head, monkeypatch)
    results = pipe(head, docs, token_budget=240)
    assert all(r.error is None for r in results), [r.error for r in results]
    # batches really mixed prompts of different lengths (left padding in use), several rows each
    assert mixed_batches(calls) >= 2, [[f.length for f in fs] for fs, _ in calls]
    assert max(len(fs) for fs, _ in calls) >= 4

    finishes = []
    for fs, outs in calls:
        for f, ids in zip(fs, outs):
            doc = docs[f.doc_index]
            assert f.input_ids == doc_ids(head, PROMPT.replace("{text}", doc.text))
            ref = reference_generate(head, f.input_ids, MAX_NEW)
            assert ids == ref, (doc.doc_id, f.length)
    for r in results:
        ref = reference_generate(head, doc_ids(head, PROMPT.replace("{text}", r.doc.text)), MAX_NEW)
        finish = "eos" if ref[-1] == EOS else "length"
        assert len(ref) == MAX_NEW or finish == "eos"
        text = head.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert r.rows == [{"prompt_id": 0, "text": text, "n_new_tokens": len(ref), "finish_reason": finish}]
        finishes.append((finish, len(ref)))
    # both kinds of rows occurred (so rows ended inside batches whose others went on), outputs vary
    assert {f for f, _ in finishes} == {"eos", "length"}, finishes
    assert any(f == "eos" and n > 1 for f, n in finishes), finishes
    texts = [r.rows[0]["text"] for r in results]
    assert len(set(texts)) > len(texts) // 2, texts


def test_sampling_is_reproducible_for_the_same_seed_and_batches(models):
    docs = gen_docs()[:6]

    def run(seed, **kw):
        head = load(models["llama"], mode="generate", prompt=PROMPT, max_new_tokens=8, do_sample=True,
                    temperature=0.8, top_p=0.95, seed=seed, **kw)
        results = pipe(head, docs, token_budget=120)
        assert all(r.error is None for r in results), [r.error for r in results]
        torch.rand(100)  # disturb the global random state between runs
        return [r.rows for r in results]

    first = run(3)
    assert run(3) == first
    assert run(4) != first
    greedy = [r.rows for r in pipe(load(models["llama"], mode="generate", prompt=PROMPT, max_new_tokens=8), docs,
                                   token_budget=120)]
    assert greedy != first


# --- 3. errors ----------------------------------------------------------------------------------

def test_too_long_prompt_fails_with_a_clear_error(models):
    head = load(models["gpt2"], eos_bias=-100.0, mode="generate", prompt=PROMPT, max_new_tokens=MAX_NEW)
    long_text = make_text(200, 5)
    n = len(doc_ids(head, PROMPT.replace("{text}", long_text)))
    assert n + MAX_NEW > 128
    results = pipe(head, [Doc("ok", "Short text."), Doc("long", long_text)])
    assert results[0].error is None and results[0].rows[0]["n_new_tokens"] == MAX_NEW
    assert results[1].error == (f"DocumentError: prompt of {n} tokens + max_new_tokens {MAX_NEW} "
                                "exceed the model window 128")
    assert results[1].stage == "encode" and results[1].rows == []

    # the limit is exact: a prompt that fills the window with max_new_tokens generates up to position 127
    text = make_text(60, 6)
    n = len(doc_ids(head, PROMPT.replace("{text}", text)))
    fits = load(models["gpt2"], eos_bias=-100.0, mode="generate", prompt=PROMPT, max_new_tokens=128 - n)
    [r] = pipe(fits, [Doc("edge", text)])
    assert r.error is None and r.rows[0]["n_new_tokens"] == 128 - n and r.rows[0]["finish_reason"] == "length"
    over = load(models["gpt2"], mode="generate", prompt=PROMPT, max_new_tokens=129 - n)
    [r] = pipe(over, [Doc("edge", text)])
    assert r.error == f"DocumentError: prompt of {n} tokens + max_new_tokens {129 - n} exceed the model window 128"


@pytest.mark.parametrize("params, match", [
    ({"mode": "ppl"}, "mode: expected 'perplexity' or 'generate'"), ({"mode": None}, "mode: expected"),
    ({"stride": -1}, "stride"), ({"stride": 1.5}, "stride"), ({"stride": True}, "stride"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "8"}, "max_new_tokens"),
    ({"mode": "generate"}, r"prompt containing '\{text\}'"),
    ({"mode": "generate", "prompt": "Summarize: {doc}"}, r"prompt containing '\{text\}'"),
    ({"mode": "generate", "prompt": None}, "prompt: expected a string"),
    ({"prompt": "Q: {text}"}, "only used with mode = 'generate'"),
    ({"temperature": 0}, "temperature"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": "0.9"}, "top_p"),
    ({"do_sample": "yes"}, "do_sample"), ({"seed": -1}, "seed"), ({"seed": 1.0}, "seed"),
])
def test_validate_params_errors(params, match):
    with pytest.raises(ValueError, match=match):
        CausalLMHead.validate_params({**CausalLMHead.params, **params})


def test_valid_params_and_setup_errors(models):
    CausalLMHead.validate_params(dict(CausalLMHead.params))
    CausalLMHead.validate_params({**CausalLMHead.params, "mode": "generate", "prompt": "{text}", "temperature": 2,
                                  "top_p": 1, "do_sample": True, "seed": 7})
    head = load(models["llama"])
    with pytest.raises(ValueError, match="stride 128 must be smaller than the model window 128"):
        CausalLMHead("lm", head.model, head.tokenizer, {"stride": 128})
    with pytest.raises(ValueError, match="leave no room for a document in the model window 128"):
        CausalLMHead("lm", head.model, head.tokenizer, {"mode": "generate", "prompt": "{text}",
                                                        "max_new_tokens": 127})
    with pytest.raises(ValueError, match="heads.lm.mode: expected"):
        CausalLMHead("lm", head.model, head.tokenizer, {"mode": "score"})


def test_prompt_braces_and_trimming(models):
    head = load(models["llama"], mode="generate", prompt="<{text}> {0} {}", max_new_tokens=4)
    text = "x {text} {y}"
    [f] = head.encode(Doc("b", text))
    assert f.input_ids == doc_ids(head, "<x {text} {y}> {0} {}")
    assert trim_generated([7, 8, 5, 6, 102, 0, 0], {102}, prompt_len=2) == [5, 6, 102]
    assert trim_generated([0, 8, 5, 0, 6], {102}, prompt_len=2) == [5, 0, 6]
    assert trim_generated([7, 8], {102}, prompt_len=2) == []
