"""Causal language models (`AutoModelForCausalLM`): document perplexity, or batched generation.

`mode = "perplexity"` (table `lm_scores`) scores every document with the standard HF sliding-window
recipe: windows of `window = max_length()` tokens start every `stride` tokens (`stride = 0` means
`window // 2`; it must be smaller than the window so that every token keeps at least one token of
context); inside a window only the tokens that the previous window did not score are scored, so
each token after the first one of the document is scored exactly once, with up to
`window - stride` tokens of left context. Each window is one Feature; the engine batches windows of
many documents (right padding: the model is causal, so padding after the real tokens changes
nothing before them). `forward` computes the per-token negative log-likelihood itself from the logits
(the HF `loss * n_tokens` shortcut over-/under-counts by one token per window), `decode` sums it over
the windows: `perplexity = exp(total_nll / n_tokens)`, `n_tokens = len(ids) - 1`.

`mode = "generate"` (table `generations`) formats `prompt` with the document
(`prompt.replace("{text}", doc.text)`: braces in the text are safe) and continues it with
`generate()`, batched by the engine with LEFT padding and an attention mask (position ids follow the
mask). Under greedy decoding (`do_sample = false`) a document's continuation in a mixed-length batch
is token-identical to the one it gets alone (tests/test_causal_lm.py checks it). Sampling
(`do_sample = true`, `temperature`, `top_p`; `top_k` is disabled so the params define the
distribution) calls `torch.manual_seed(seed)` before each `generate()` call: the same documents in
the same batches give the same outputs, but a document's sample depends on the batch it lands in
(its row and the other rows draw from one random stream), hence on the token budget and on the
other documents of the run. Generation is never truncated: a prompt whose tokens plus
`max_new_tokens` exceed the model window fails with a DocumentError naming the three numbers.
Other generation settings of the model's `generation_config` (repetition penalty, ...) apply;
beam search is off (`num_beams = 1`). The engine's token budget counts prompt tokens only, not
the `max_new_tokens` each row adds.

Special tokens, one rule for both modes: the text is tokenized without special tokens, and the
model's bos token is put in front when the tokenizer adds special tokens of its own (Llama-style
tokenizers add bos; GPT-2's adds nothing, so no bos, as in the HF perplexity recipe). No eos or
separator is ever appended: it would be scored as part of the document, or end the prompt.
"""
from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM

from core.config import Number, ParamError

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable, trim_generated

MODES = ("perplexity", "generate")
TABLES = {"perplexity": "lm_scores", "generate": "generations"}

# shared with masked_lm (pseudo_perplexity): one row per document, the columns of both kinds of score
LM_SCORES = ResultTable(
    "lm_scores",
    (pa.field("perplexity", pa.float64()), pa.field("mean_nll", pa.float64()),  # causal_lm
     pa.field("pseudo_perplexity", pa.float64()), pa.field("mean_log_prob", pa.float64()),  # masked_lm
     pa.field("n_tokens", pa.int64()), pa.field("n_windows", pa.int32())),
    upstream=("'perplexity': any_value(r.perplexity), 'pseudo_perplexity': any_value(r.pseudo_perplexity), "
              "'n_tokens': any_value(r.n_tokens)"),
    doc="one row per document: (pseudo-)perplexity over its tokens")
GENERATIONS = ResultTable(
    "generations",
    (pa.field("prompt_id", pa.int32()), pa.field("text", pa.string()),
     pa.field("n_new_tokens", pa.int32()), pa.field("finish_reason", pa.string())),
    upstream="'text': arg_min(r.text, r.prompt_id), 'n': count(r.doc_id)",
    doc="one row per document and prompt: the generated continuation")


class CausalLMParams(HeadParams):
    mode: Literal["perplexity", "generate"] = "perplexity"
    """perplexity -> `lm_scores` | generate -> `generations`"""
    stride: Annotated[int, Field(ge=0)] = 0
    """perplexity: window step in tokens (0: half the model window)"""
    prompt: str = ""
    """generate: the template, with {text} where the document goes"""
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    """generate: tokens to generate (prompt + this must fit the model window)"""
    do_sample: bool = False
    """generate: false = greedy; true samples with temperature / top_p / seed"""
    temperature: Number(gt=0) = 1.0
    """generate, sampling: softmax temperature"""
    top_p: Number(gt=0, le=1) = 1.0
    """generate, sampling: nucleus mass"""
    seed: Annotated[int, Field(ge=0)] = 0
    """generate, sampling: torch seed set before each generate() call"""

    @model_validator(mode="after")
    def _prompt_fits_mode(self):
        if self.mode == "generate" and "{text}" not in self.prompt:
            raise ParamError("prompt", f"generate mode needs a prompt containing '{{text}}' (where the document "
                                       f"goes), not {self.prompt!r}")
        if self.mode == "perplexity" and self.prompt:
            raise ParamError("prompt", "prompt is only used with mode = 'generate'; perplexity scores the document "
                                       "alone")
        return self


def perplexity_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The HF sliding-window plan over `n` tokens: `(begin, end, score_from)` per window.

    The window covers `ids[begin:end]`; positions `score_from .. end - begin - 1` inside it are
    scored (the tokens the previous window did not reach; the document's first token is never
    scored, it has no prediction). Needs `0 < stride < window` and `n >= 2`.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride must be in 1..{window - 1} for a {window}-token window, not {stride}")
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1) - begin))
        prev_end = end
        if end == n:
            break
    return out


def token_nll(logits: torch.Tensor, ids: Sequence[int], score_from: int) -> np.ndarray:
    """Negative log-likelihood of `ids[score_from:]`, each predicted from the logits one position
    earlier; `logits` is `(len(ids), vocab)` (padding rows beyond `len(ids)` are ignored)."""
    n = len(ids)
    if not 1 <= score_from <= n:
        raise ValueError(f"score_from {score_from} out of range for {n} tokens")
    if score_from == n:
        return np.zeros(0, dtype=np.float64)
    pred = logits[score_from - 1:n - 1].float()
    target = torch.as_tensor(list(ids[score_from:n]), dtype=torch.long, device=pred.device)
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="none")
    return nll.double().cpu().numpy()


def combine_windows(window_nlls: Sequence[np.ndarray]) -> dict:
    """One `lm_scores` row from the per-token NLLs of a document's windows (in any order of sum)."""
    nll = np.concatenate([np.asarray(w, dtype=np.float64) for w in window_nlls]) if window_nlls else np.zeros(0)
    n = int(nll.size)
    if n == 0:
        raise ValueError("no scored tokens")
    mean = math.fsum(nll.tolist()) / n
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return {"perplexity": ppl, "n_tokens": n, "mean_nll": mean, "n_windows": len(window_nlls)}


class CausalLMHead(Head):
    task = "causal_lm"
    table = "lm_scores"  # the instance value is set in setup(): lm_scores | generations
    tables = (LM_SCORES, GENERATIONS)
    model_class = AutoModelForCausalLM
    Params = CausalLMParams

    @classmethod
    def table_for(cls, p) -> str:
        return TABLES[p.get("mode", cls.params["mode"])]

    def setup(self) -> None:
        cfg = self.model.config
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"causal_lm needs a decoder-only model, not the encoder-decoder {cfg.model_type!r}")
        self.mode = self.p["mode"]
        self.table = TABLES[self.mode]
        self.window = self.max_length()
        if self.window < 2:
            raise ValueError(f"the model window ({self.window} tokens) is too small")
        self.bos_prefix = self._bos_prefix()
        self.eos_ids = self._eos_ids()
        if self.mode == "perplexity":
            self.stride = int(self.p["stride"]) or self.window // 2
            if self.stride >= self.window:
                raise ValueError(f"stride {self.stride} must be smaller than the model window {self.window} "
                                 f"(windows start every `stride` tokens and need context)")
        else:
            mnt = self.p["max_new_tokens"]
            overhead = len(self.prompt_ids(""))  # the template and bos, without the document
            if overhead + 1 + mnt > self.window:
                raise ValueError(f"the prompt template ({overhead} tokens) + max_new_tokens {mnt} leave no room "
                                 f"for a document in the model window {self.window}")
            self.generation_config = self._generation_config()

    def _bos_prefix(self) -> list[int]:
        """[bos] when the tokenizer adds special tokens of its own and the model has a bos, else []."""
        own = self.tokenizer("", add_special_tokens=True, return_token_type_ids=False,
                             return_attention_mask=False)["input_ids"]
        if not own:
            return []
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = getattr(self.model.generation_config, "bos_token_id", None)
        if bos is None:
            bos = getattr(self.model.config, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
        return [] if bos is None else [int(bos)]

    def _eos_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

    def _generation_config(self):
        gc = copy.deepcopy(self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else self.pad_id()
        sample = self.p["do_sample"]
        gc.update(max_new_tokens=self.p["max_new_tokens"], num_beams=1, num_return_sequences=1,
                  do_sample=sample, pad_token_id=int(pad), eos_token_id=sorted(self.eos_ids) or None,
                  # greedy: sampling knobs back to their neutral values (no warnings, no effect)
                  temperature=float(self.p["temperature"]) if sample else 1.0,
                  top_p=float(self.p["top_p"]) if sample else 1.0,
                  top_k=0 if sample else None)
        return gc

    # --- tokenization -------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Model input for `text`: the bos prefix (see module doc) + the tokens, no eos."""
        enc = self.tokenizer(text, add_special_tokens=False, return_token_type_ids=False,
                             return_attention_mask=False)
        return self.bos_prefix + list(enc["input_ids"])

    def prompt_text(self, text: str) -> str:
        return self.p["prompt"].replace("{text}", text)

    def prompt_ids(self, text: str) -> list[int]:
        return self.text_ids(self.prompt_text(text))

    # --- the contract -------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        if not isinstance(doc.text, str) or not doc.text.strip():
            raise DocumentError("empty text")
        if self.mode == "perplexity":
            ids = self.text_ids(doc.text)
            if len(ids) < 2:
                raise DocumentError(f"perplexity needs at least 2 tokens (the first token has no prediction); "
                                 f"the document has {len(ids)}")
            plan = perplexity_windows(len(ids), self.window, self.stride)
            return [Feature(0, ids[b:e], None, {"window": k, "n_windows": len(plan), "begin": b,
                                                "score_from": s, "n_scored": len(ids) - 1})
                    for k, (b, e, s) in enumerate(plan)]
        ids = self.prompt_ids(doc.text)
        mnt, w = self.p["max_new_tokens"], self.window
        if not ids:
            raise DocumentError("the prompt has no tokens")
        if len(ids) + mnt > w:
            raise DocumentError(f"prompt of {len(ids)} tokens + max_new_tokens {mnt} exceed the model window {w}")
        return [Feature(0, ids, None, {"prompt_id": 0})]

    def forward(self, feats: Sequence[Feature]) -> list[Any]:
        if self.mode == "perplexity":
            batch = self.collate(feats)  # right padding: causal attention never sees the pads
            with torch.inference_mode():
                logits = self.model(**batch).logits
                return [token_nll(logits[i], f.input_ids, f.meta["score_from"]) for i, f in enumerate(feats)]
        batch = self.collate(feats, left=True)  # left padding: every row continues at the last column
        width = batch["input_ids"].shape[1]
        if self.p["do_sample"]:
            torch.manual_seed(self.p["seed"])  # per generate() call: reproducible for the same batch
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self.generation_config)
        return [trim_generated(row, self.eos_ids, prompt_len=width) for row in out.cpu().tolist()]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[Any]) -> list[dict]:
        if self.mode == "perplexity":
            pairs = sorted(zip(feats, outs), key=lambda p: p[0].meta["window"])
            if [f.meta["window"] for f, _ in pairs] != list(range(feats[0].meta["n_windows"])):
                raise RuntimeError(f"windows missing: got {[f.meta['window'] for f, _ in pairs]}")
            row = combine_windows([o for _, o in pairs])
            if row["n_tokens"] != feats[0].meta["n_scored"]:
                raise RuntimeError(f"scored {row['n_tokens']} tokens, expected {feats[0].meta['n_scored']}")
            return [row]
        [ids] = outs
        finish = "eos" if ids and ids[-1] in self.eos_ids else "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return [{"prompt_id": 0, "text": text, "n_new_tokens": len(ids), "finish_reason": finish}]
