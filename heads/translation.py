"""Translation (any text-to-text task): batched `generate()` of an `AutoModelForSeq2SeqLM`.

transformers 5 has no translation pipeline, so batching is ours, and it is the engine's: it hands
`forward` features of many documents, right-padded with an attention mask (the correct padding for
an encoder-decoder model: the encoder masks the pads and so does the cross-attention, the decoder
never sees them). A document translated inside a mixed-length batch yields the same token ids as the
same document generated alone (tests/test_translation.py checks it for greedy and beam search).

Long documents are never truncated: a document whose tokens (with the special tokens and the
`prefix`) fit the model window is one segment; a longer one is cut at sentence boundaries
(`split_segments`), consecutive sentences packed greedily into segments under the window, and a
single sentence longer than the window is cut into token windows without overlap. Each segment is
translated on its own; the translations are joined with one space, in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import pyarrow as pa
import torch
from pydantic import Field
from transformers import AutoModelForSeq2SeqLM

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable, trim_generated

TRANSLATIONS = ResultTable(
    "translations", (pa.field("translation", pa.string()), pa.field("n_segments", pa.int32())),
    upstream="'text': any_value(r.translation)",
    doc="one row per document: its translation (n_segments: sentence groups translated separately)")


class TranslationParams(HeadParams):
    num_beams: Annotated[int, Field(ge=1)] = 1
    """beam search width (1: greedy)"""
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    """longest output per segment, in tokens (capped by the model's positions)"""
    prefix: str = ""
    """text put before every segment, e.g. "translate English to German: " for T5"""

# End of a sentence: ., !, ? or an ellipsis (with closing quotes or brackets) followed by whitespace,
# CJK full-width sentence ends, or a line break. "3.14" and "e.g.," are not boundaries.
_SENTENCE_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*(?=\s)"
    r"|[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019)\uff09]*"
    r"|\r\n|[\n\r\u2028\u2029\x0b\x0c\x85]"
)


@dataclass(frozen=True)
class Segment:
    """A whitespace-trimmed span of the document: `text == document[start:end]`."""

    start: int
    end: int
    text: str


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the sentences of `text`, whitespace-trimmed, in order.

    Only whitespace lies between (and around) the spans, so nothing but whitespace is lost.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        a, b = _trim(text, start, m.end())
        if a < b:
            spans.append((a, b))
        start = m.end()
    a, b = _trim(text, start, len(text))
    if a < b:
        spans.append((a, b))
    return spans


def split_segments(text: str, limit: int, n_tokens: Callable[[str], int],
                   token_offsets: Callable[[str], Sequence[tuple[int, int]]]) -> list[Segment]:
    """Cut `text` into segments whose model input has at most `limit` tokens.

    `n_tokens(s)` is the length of the model input built from the segment text `s` (prefix and
    special tokens included); `token_offsets(s)` gives the character spans of the content tokens of
    `s` (no prefix, no special tokens). The whole text is one segment when it fits; otherwise
    consecutive sentences are packed greedily (each segment takes as many sentences as fit) and a
    sentence that does not fit alone is cut into consecutive token windows, without overlap.
    Segments are trimmed and in order; only whitespace lies between them. Raises DocumentError for
    empty text or when not even one token fits (ValueError when the prefix leaves no room).
    """
    a, b = _trim(text, 0, len(text))
    if a == b:
        raise DocumentError("empty text")
    if n_tokens(text[a:b]) <= limit:
        return [Segment(a, b, text[a:b])]
    overhead = n_tokens("")
    budget = limit - overhead  # content tokens per segment
    if budget < 1:
        raise ValueError(f"the prefix and special tokens ({overhead} tokens) leave no room in a {limit}-token window")

    sents = split_sentences(text)
    counts = [n_tokens(text[s:e]) for s, e in sents]
    out: list[Segment] = []

    def emit(s: int, e: int) -> None:
        out.append(Segment(s, e, text[s:e]))

    i = 0
    while i < len(sents):
        if counts[i] > limit:
            for s, e in _token_windows(text, sents[i], budget, limit, n_tokens, token_offsets):
                emit(s, e)
            i += 1
            continue
        # estimate from per-sentence counts, then make it exact: shrink while too long, grow while it fits
        j, est = i + 1, counts[i] - overhead
        while j < len(sents) and counts[j] <= limit and est + counts[j] - overhead <= budget:
            est += counts[j] - overhead
            j += 1
        while j > i + 1 and n_tokens(text[sents[i][0]:sents[j - 1][1]]) > limit:
            j -= 1
        while j < len(sents) and counts[j] <= limit and n_tokens(text[sents[i][0]:sents[j][1]]) <= limit:
            j += 1
        emit(sents[i][0], sents[j - 1][1])
        i = j
    return out


def _token_windows(text: str, span: tuple[int, int], budget: int, limit: int, n_tokens: Callable[[str], int],
                   token_offsets: Callable[[str], Sequence[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Cut one over-long sentence into consecutive spans of at most `budget` tokens each.

    A window runs from the start of its first token to the start of the next window's first token
    (trimmed), so characters the tokenizer drops are kept too. Each window is re-tokenized and
    shrunk until it fits, since a word cut in the middle may tokenize into more pieces.
    """
    a, b = span
    offs = [(s, e) for s, e in token_offsets(text[a:b]) if e > s]
    starts = [a + s for s, _ in offs]
    out: list[tuple[int, int]] = []
    k, cur = 0, a
    while k < len(starts):
        take = min(budget, len(starts) - k)
        while True:
            nxt = k + take
            end = b if nxt >= len(starts) else max(starts[nxt], cur)
            s, e = _trim(text, cur, end)
            n = n_tokens(text[s:e]) if s < e else 0
            if n <= limit:
                break
            if take == 1:
                raise DocumentError(f"a single token {text[s:e]!r} does not fit a {limit}-token window")
            take = max(1, take - (n - limit))
        if s < e:
            out.append((s, e))
        k, cur = nxt, end
        while k < len(starts) and starts[k] < cur:  # tokens already covered (overlapping offsets)
            k += 1
    s, e = _trim(text, cur, b)
    if s < e:  # trailing characters no token covers
        if out and n_tokens(text[out[-1][0]:e]) <= limit:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class TranslationHead(Head):
    task = "translation"
    table = "translations"
    tables = (TRANSLATIONS,)
    model_class = AutoModelForSeq2SeqLM
    Params = TranslationParams
    batch_min_fill = 0.0  # batches fill up to the token budget: each decoding step is paid per batch

    def setup(self) -> None:
        mnt, prefix = self.p["max_new_tokens"], self.p["prefix"]
        cfg = self.model.config
        if not getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"translation needs an encoder-decoder (seq2seq) model, not {cfg.model_type!r}")
        self.window = self.max_length()
        overhead = self.n_tokens("")
        if overhead >= self.window:
            raise ValueError(f"prefix {prefix!r} takes {overhead} tokens with the special tokens; "
                             f"the model window is {self.window}")
        # learned / fixed-size position tables (BART, Marian, ...) index out of range past this length
        limit = getattr(cfg, "max_position_embeddings", None)
        self.max_new_tokens = min(mnt, limit) if isinstance(limit, int) and limit > 0 else mnt
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = cfg.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)

    # --- tokenizer helpers, also the callables handed to split_segments -------------------
    def input_ids(self, segment_text: str) -> list[int]:
        last = getattr(self, "_last_ids", None)  # encode asks again for the text split_segments just measured
        if last is not None and last[0] == segment_text:
            return list(last[1])
        enc = self.tokenizer(self.p["prefix"] + segment_text, add_special_tokens=True,
                             return_token_type_ids=False, return_attention_mask=False)
        ids = list(enc["input_ids"])
        self._last_ids = (segment_text, ids)
        return list(ids)

    def n_tokens(self, segment_text: str) -> int:
        return len(self.input_ids(segment_text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             return_token_type_ids=False, return_attention_mask=False)
        return [tuple(o) for o in enc["offset_mapping"]]

    def segments(self, text: str) -> list[Segment]:
        return split_segments(text, self.window, self.n_tokens, self.token_offsets)

    # --- the contract -------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        if not isinstance(doc.text, str) or not doc.text.strip():
            raise DocumentError("empty text")
        segs = self.segments(doc.text)
        feats = []
        for k, seg in enumerate(segs):
            ids = self.input_ids(seg.text)
            if len(ids) > self.window:  # split_segments guarantees it; never feed an over-long input
                raise RuntimeError(f"segment {k} has {len(ids)} tokens, over the {self.window}-token window")
            # token_type_ids stay None: generate() rejects them
            feats.append(Feature(0, ids, None, {"segment": k, "n_segments": len(segs),
                                                "start": seg.start, "end": seg.end}))
        return feats

    def forward(self, feats: Sequence[Feature]) -> list[list[int]]:
        batch = self.collate(feats)  # right padding + attention_mask
        if self.p["num_beams"] == 1 and isinstance(self.model, torch.nn.Module):
            rows = shrinking_greedy(self.model, batch, self.max_new_tokens, self.eos_ids)
            if rows is not None:  # finished rows leave the batch: no step is paid for the longest row's sake
                return [trim_generated(row, self.eos_ids, prompt_len=1) for row in rows]
        with torch.inference_mode():
            out = self.model.generate(**batch, num_beams=self.p["num_beams"], max_new_tokens=self.max_new_tokens,
                                      do_sample=False, num_return_sequences=1)
        # an encoder-decoder output starts with the decoder start token
        return [trim_generated(row, self.eos_ids, prompt_len=1) for row in out.cpu().tolist()]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[list[int]]) -> list[dict]:
        pairs = sorted(zip(feats, outs), key=lambda p: p[0].meta["segment"])
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
                 for _, ids in pairs]
        return [{"translation": join_translations(texts), "n_segments": len(pairs)}]


def join_translations(texts: Sequence[str]) -> str:
    """Segment translations in order, each stripped, joined with one space (empty ones skipped)."""
    return " ".join(t.strip() for t in texts if t.strip())


# Logits processors whose effect on a row depends on that row alone (its tokens so far, its length):
# dropping finished rows from the batch leaves them exact. Any other rule: plain generate().
ROW_LOCAL_PROCESSORS = {"MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
                        "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor",
                        "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor", "SuppressTokensLogitsProcessor",
                        "SuppressTokensAtBeginLogitsProcessor", "InfNanRemoveLogitsProcessor"}


def _greedy_processors(model, input_ids: torch.Tensor, max_new_tokens: int):
    """The logits processors `generate()` would apply in greedy search, or None when one is not row-local
    (or this transformers version prepares them differently)."""
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.update(num_beams=1, do_sample=False, max_new_tokens=max_new_tokens, max_length=1 + max_new_tokens,
              num_return_sequences=1)
    if gc.stop_strings or gc.max_time or getattr(gc, "assistant_model", None):
        return None
    try:
        model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device=input_ids.device)
        procs = model._get_logits_processor(generation_config=gc, input_ids_seq_length=1, encoder_input_ids=input_ids,
                                            device=input_ids.device, model_kwargs={})
    except Exception:  # private API: a changed signature means plain generate()
        return None
    if any(type(p).__name__ not in ROW_LOCAL_PROCESSORS for p in procs):
        return None
    return procs


def shrinking_greedy(model, batch: dict[str, torch.Tensor], max_new_tokens: int, eos_ids) -> list[list[int]] | None:
    """Greedy decoding of an encoder-decoder batch in which a row leaves the batch when it ends.

    `generate()` keeps computing every row until the longest one ends; here the decoder's cache, the
    encoder states and the mask of finished rows are dropped at once, so each step costs the rows still
    running. Each row's computation is the same as in `generate()` (the same processors, argmax, eos):
    rows equal a document generated alone (tests/test_translation.py). Returns rows as `generate()` does
    ([decoder start] + tokens, up to and with eos), or None when this model needs plain generate().
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None or not eos_ids:
        return None
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    procs = _greedy_processors(model, input_ids, max_new_tokens)
    if procs is None:
        return None
    device = input_ids.device
    eos = torch.tensor(sorted(eos_ids), device=device)
    with torch.inference_mode():
        encoder_states = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        active = torch.arange(input_ids.shape[0], device=device)  # original row of each running row
        seqs = torch.full((input_ids.shape[0], 1), int(start), dtype=torch.long, device=device)
        rows: list[list[int] | None] = [None] * input_ids.shape[0]
        for step in range(max_new_tokens):
            out = model(encoder_outputs=(encoder_states,), attention_mask=mask, decoder_input_ids=seqs[:, -1:],
                        past_key_values=cache, use_cache=True)
            scores = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
            nxt = procs(seqs, scores).argmax(dim=-1)
            seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
            done = torch.isin(nxt, eos) if step < max_new_tokens - 1 else torch.ones_like(nxt, dtype=torch.bool)
            if bool(done.any()):
                for k in torch.nonzero(done).flatten().tolist():
                    rows[int(active[k])] = seqs[k].tolist()
                keep = torch.nonzero(~done).flatten()
                if keep.numel() == 0:
                    break
                cache = out.past_key_values
                cache.batch_select_indices(keep)
                encoder_states, mask, seqs, active = encoder_states[keep], mask[keep], seqs[keep], active[keep]
            else:
                cache = out.past_key_values
    return [r if r is not None else [int(start)] for r in rows]
