"""CTranslate2 for the translation head: the HF folder converted once (cached), run at `dtype`.

The conversion is CTranslate2's own Transformers converter (BART, Marian, M2M100, mBART, Pegasus,
T5, ...) saving float32 weights; the precision is CTranslate2's `compute_type` at load (float32,
int8, bfloat16, float16 on CUDA), so one conversion serves every precision. Two gaps of the
converter with transformers 5 are filled here: BART configs no longer carry `normalize_before`
(BART is post-norm: False), and a tokenizer without eos/bos names gets them from the model's ids.

`Ct2Model.generate` answers like `model.generate` (rows start with the decoder start token, end
with eos, padded after), so the translation head's batching, segmenting and decoding are shared.
The generation config's rules CTranslate2 knows are passed on (no_repeat_ngram_size,
repetition_penalty, bad words, minimum length, a forced eos at the length limit); the parity probe
checks the result: float32 greedy output must equal torch's token for token on the probe texts,
lossy precisions must score torch's greedy output within LOSSY_TOLERANCE (mean |Δ log p| per token).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import BackendError, cache_key, cached_build, weights_digest

LOSSY_TOLERANCE = 0.1  # mean |Δ log p| per token of torch's greedy output, probe texts
PROBE_TEXTS = [
    "The government said on Monday that shares in the company rose sharply.",
    "Hello.",
    "Analysts in London expected further gains as the election neared, and technology firms reported demand.",
    "Ünïcode tëxt — 42% of 3.14 € 🙂",
]


def convert(source: str, folder: Path, revision: str | None = None) -> None:
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class, path, **kwargs):
            model = model_class.from_pretrained(path, use_safetensors=True, **kwargs)
            if model.config.model_type == "bart" and not hasattr(model.config, "normalize_before"):
                model.config.normalize_before = False  # BART is post-norm; transformers 5 dropped the field
            self.loaded = model
            return model

        def load_tokenizer(self, tokenizer_class, path, **kwargs):
            tok = tokenizer_class.from_pretrained(path, **kwargs)
            gen, cfg = self.loaded.generation_config, self.loaded.config
            eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id
            if isinstance(eos, list):
                eos = eos[0]
            if tok.eos_token is None and eos is not None:
                tok.eos_token = tok.convert_ids_to_tokens(int(eos))
            if tok.bos_token is None and cfg.bos_token_id is not None:
                tok.bos_token = tok.convert_ids_to_tokens(int(cfg.bos_token_id))
            return tok

    Converter(source, revision=revision).convert(str(folder), force=True)


class Ct2Model:
    """`generate()` of a seq2seq model, run by a CTranslate2 Translator."""

    backend = "ctranslate2"

    def __init__(self, translator: Any, torch_model: Any, tokenizer: Any, folder: Path):
        self.translator, self.torch_model, self.tokenizer, self.folder = translator, torch_model, tokenizer, folder
        gen = torch_model.generation_config
        self.start_id = int(torch_model.config.decoder_start_token_id)
        eos = gen.eos_token_id if gen.eos_token_id is not None else torch_model.config.eos_token_id
        self.eos_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else torch_model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.forced_eos = gen.forced_eos_token_id if isinstance(gen.forced_eos_token_id, int) else None
        self.options: dict[str, Any] = {}
        if gen.no_repeat_ngram_size:
            self.options["no_repeat_ngram_size"] = int(gen.no_repeat_ngram_size)
        if gen.repetition_penalty and gen.repetition_penalty != 1.0:
            self.options["repetition_penalty"] = float(gen.repetition_penalty)
        if gen.bad_words_ids:
            self.options["suppress_sequences"] = [tokenizer.convert_ids_to_tokens(ids) for ids in gen.bad_words_ids]
        if gen.min_length and gen.min_length > 1:  # counts the decoder start token
            self.options["min_decoding_length"] = int(gen.min_length) - 1
        if gen.length_penalty is not None:
            self.options["length_penalty"] = float(gen.length_penalty)

    @property
    def config(self):
        return self.torch_model.config

    @property
    def generation_config(self):
        return self.torch_model.generation_config

    @property
    def name_or_path(self):
        return getattr(self.torch_model, "name_or_path", "")

    def parameters(self):
        return self.torch_model.parameters()

    def eval(self):
        return self

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, num_beams: int = 1,
                 max_new_tokens: int = 256, do_sample: bool = False, num_return_sequences: int = 1,
                 **_: Any) -> torch.Tensor:
        if do_sample or num_return_sequences != 1:
            raise ValueError("the ctranslate2 backend runs greedy or beam search with one output per input")
        ids = input_ids.cpu().tolist()
        mask = attention_mask.cpu().tolist() if attention_mask is not None else [[1] * len(r) for r in ids]
        source = [self.tokenizer.convert_ids_to_tokens([t for t, m in zip(row, mrow) if m]) for row, mrow in zip(ids, mask)]
        results = self.translator.translate_batch(source, beam_size=num_beams, max_decoding_length=max_new_tokens,
                                                  return_end_token=True, max_input_length=0, **self.options)
        rows = []
        for r in results:
            out = [int(t) for t in self.tokenizer.convert_tokens_to_ids(r.hypotheses[0])]
            if self.forced_eos is not None and len(out) >= max_new_tokens and not (set(out) & self.eos_ids):
                out[max_new_tokens - 1] = self.forced_eos  # HF forces eos as the last token at the limit
            rows.append([self.start_id] + out)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.long,
                            device=input_ids.device)

    # --- building and probing --------------------------------------------------------------
    @classmethod
    def for_head(cls, head: Any, dtype: str, source: str) -> "Ct2Model":
        import ctranslate2
        import transformers

        net = head.model
        revision = getattr(net.config, "_commit_hash", None) if not Path(source).is_dir() else None
        key = cache_key("ctranslate2", source=source, weights=weights_digest(source, net),
                        ct2=ctranslate2.__version__, transformers=transformers.__version__)
        try:
            folder = cached_build("ct2", key, lambda tmp: convert(source, tmp, revision))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"cannot convert to CTranslate2: {first}") from exc
        device = next(net.parameters()).device
        threads = int(os.environ.get("TASKHEADS_THREADS", torch.get_num_threads()))
        try:
            translator = ctranslate2.Translator(str(folder), device="cuda" if device.type == "cuda" else "cpu",
                                                device_index=device.index or 0, compute_type=dtype,
                                                inter_threads=1, intra_threads=threads)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"ctranslate2 cannot run {folder} at dtype {dtype} on {device.type}: {first}") from exc
        model = cls(translator, net, head.tokenizer, folder)
        model.probe(head, dtype)
        return model

    def probe(self, head: Any, dtype: str) -> None:
        """Refuse the converted model when it drifts from the torch model on the probe texts."""
        tok = self.tokenizer
        enc = tok([head.p.get("prefix", "") + t for t in PROBE_TEXTS], truncation=True,
                  max_length=min(head.window, 64), padding=True, return_tensors="pt", return_token_type_ids=False)
        enc = {k: v.to(next(self.torch_model.parameters()).device) for k, v in enc.items()}
        new = min(int(head.max_new_tokens), 24)
        beams = int(head.p.get("num_beams", 1))
        with torch.inference_mode():
            ref = self.torch_model.generate(**enc, num_beams=beams, max_new_tokens=new, do_sample=False)
        got = self.generate(enc["input_ids"], enc["attention_mask"], num_beams=beams, max_new_tokens=new)
        trim = head_trim(self.eos_ids)
        ref_rows, got_rows = [trim(r) for r in ref.cpu().tolist()], [trim(r) for r in got.cpu().tolist()]
        if dtype == "float32":
            if ref_rows != got_rows:
                bad = sum(a != b for a, b in zip(ref_rows, got_rows))
                raise BackendError(f"ctranslate2 float32 model {self.folder} drifts from the torch model: "
                                   f"{bad} of {len(ref_rows)} probe translations differ: delete that folder to "
                                   "convert again, or use backend = \"torch\"")
            return
        err = self.score_drift(enc, ref_rows)
        if not err <= LOSSY_TOLERANCE:
            raise BackendError(f"ctranslate2 {dtype} model {self.folder} drifts from the torch model on the probe "
                               f"texts (mean |Δ log p| {err:.3f} > {LOSSY_TOLERANCE:g}): delete that folder to "
                               "convert again, or use backend = \"torch\"")

    def score_drift(self, enc: dict[str, torch.Tensor], targets: list[list[int]]) -> float:
        """Mean |Δ log p| per token between torch and CTranslate2 scoring the same target tokens."""
        tok = self.tokenizer
        ids, mask = enc["input_ids"].cpu().tolist(), enc["attention_mask"].cpu().tolist()
        source = [tok.convert_ids_to_tokens([t for t, m in zip(r, mr) if m]) for r, mr in zip(ids, mask)]
        bodies = [[t for t in row[1:] if t not in self.eos_ids] for row in targets]
        scored = self.translator.score_batch(source, [tok.convert_ids_to_tokens(b) for b in bodies])
        diffs = []
        for k, (body, res) in enumerate(zip(bodies, scored)):
            dec = torch.tensor([[self.start_id] + body], device=enc["input_ids"].device)
            with torch.inference_mode():
                logits = self.torch_model(input_ids=enc["input_ids"][k:k + 1], attention_mask=enc["attention_mask"][k:k + 1],
                                          decoder_input_ids=dec).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1).cpu().numpy()
            ref = [logp[i, t] for i, t in enumerate(body)]
            got = list(res.log_probs)[:len(body)]
            diffs.extend(abs(a - b) for a, b in zip(ref, got))
        return float(np.mean(diffs)) if diffs else 0.0


def head_trim(eos_ids):
    from heads.base import trim_generated

    return lambda row: trim_generated(row, eos_ids, prompt_len=1)
