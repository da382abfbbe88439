"""Token classification (NER): `AutoModelForTokenClassification` logits -> entity spans.

The decoding reproduces the HF `TokenClassificationPipeline` of transformers 5.23 (gather the
pre-entities with its subword rule, then aggregate with none | simple | first | average | max), so a
document that fits one model window gives exactly the pipeline's entities. Two deliberate
differences in the rows: `text` is the slice of the ORIGINAL document (`doc.text[start_char:
end_char]`), not the pipeline's detokenized "word", and long documents are not truncated.

Long documents are split into overlapping windows (`stride` tokens of overlap). Every token of the
document takes its logits from the single window in which it is most central (farthest from a
window edge), and the stitched per-token logits are then decoded once, as if the document were one
sequence: an entity crossing a window seam comes out once and whole, never duplicated.

The pure parts (window positions, window choice, stitching, pre-entity gathering, aggregation)
are plain functions over numpy arrays and lists, so they can be tested with hand-made logits.
"""
from __future__ import annotations

from typing import Annotated, Mapping, Sequence

import numpy as np
import pyarrow as pa
from pydantic import AfterValidator, Field
from transformers import AutoModelForTokenClassification

from core.config import Expect, Unexpected

from .base import Doc, DocumentError, Feature, Head, HeadParams, ResultTable

AGGREGATIONS = ("none", "simple", "first", "average", "max")
WORD_AGGREGATIONS = ("first", "average", "max")
WORD_RULES = ("pipeline", "whitespace")

ENTITIES = ResultTable(
    "entities",
    (pa.field("entity_group", pa.string()), pa.field("text", pa.string()),
     pa.field("start_char", pa.int64()), pa.field("end_char", pa.int64()), pa.field("score", pa.float64())),
    upstream=("'n': count(r.doc_id), 'groups': list(DISTINCT r.entity_group) FILTER (WHERE r.doc_id IS NOT NULL), "
              "'texts': list(r.text ORDER BY r.start_char) FILTER (WHERE r.doc_id IS NOT NULL)"),
    doc="one row per entity: its group, the text slice and character offsets")


def _aggregation(value: str) -> str:
    if value.lower() not in AGGREGATIONS:
        raise Unexpected(value)
    return value  # as written: params are hashed into the model id; setup lower-cases it


def _words(value: str) -> str:
    if value not in WORD_RULES:
        raise Unexpected(value)
    return value


class NerParams(HeadParams):
    added_later = ("words", "drop_punctuation", "stop_words")

    aggregation: Annotated[str, AfterValidator(_aggregation), Expect("one of " + ", ".join(AGGREGATIONS))] = "simple"
    """none | simple | first | average | max (HF semantics; any case)"""
    stride: Annotated[int, Field(ge=0)] = 128
    """token overlap between windows of a long document"""
    ignore_labels: list[str] = ["O"]
    """labels that never make an entity"""
    words: Annotated[str, AfterValidator(_words), Expect("one of " + ", ".join(WORD_RULES))] = "pipeline"
    """what a word is for first | average | max: the pipeline's rule (a WordPiece tokenizer makes
    every punctuation mark a word: O'Neill is three) or whitespace (a run of tokens with no space
    between them, less the punctuation at its ends and a possessive 's)"""
    drop_punctuation: bool = False
    """emit no entity without a letter or digit (a lone "-" or "&")"""
    stop_words: list[str] = []
    """emit no entity that is one of these words alone (case-insensitive: "of", "Mr")"""


def tokenize_windows(tokenizer, text: str, window: int, stride: int) -> dict:
    """Overlapping windows of a document with offsets and, per window, each position's document
    token index (-1 for special tokens): what heads that predict per token need for long texts."""
    enc = tokenizer(text, truncation=True, max_length=window, stride=stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = enc["input_ids"]
    if not ids or not isinstance(ids[0], list):  # some tokenizers do not nest a single window
        enc = {k: [v] for k, v in enc.items()}
        ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    specials = [list(m) for m in enc["special_tokens_mask"]]
    offsets = [[(int(s), int(e)) for s, e in om] for om in enc["offset_mapping"]]
    try:
        positions = window_positions(specials, stride, offsets)
    except ValueError as exc:
        raise DocumentError(str(exc)) from None
    return {"ids": [list(map(int, w)) for w in ids], "types": [list(t) for t in types] if types is not None else None,
            "offsets": offsets, "positions": positions}


class NerHead(Head):
    task = "ner"
    table = "entities"
    tables = (ENTITIES,)
    model_class = AutoModelForTokenClassification
    Params = NerParams

    def setup(self) -> None:
        self.aggregation = self.p["aggregation"].lower()
        if self.aggregation in WORD_AGGREGATIONS and not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"aggregation {self.aggregation!r} needs a fast tokenizer (word offsets); "
                             "use 'simple' or a fast tokenizer")
        stride = self.p["stride"]
        self.ignore_labels = list(self.p["ignore_labels"] or [])
        self.words = self.p["words"]
        if self.words != "pipeline" and self.aggregation not in WORD_AGGREGATIONS:
            raise ValueError(f"words = {self.words!r} needs aggregation first, average or max "
                             f"(not {self.aggregation!r}): none and simple label tokens, not words")
        self.drop_punctuation = bool(self.p["drop_punctuation"])
        self.stop_words = {w.lower() for w in self.p["stop_words"] or []}

        cfg = self.model.config
        self.id2label = {int(i): str(label) for i, label in cfg.id2label.items()}
        self.window = self.max_length()
        capacity = self.window - self.tokenizer.num_special_tokens_to_add(pair=False)
        if capacity < 1:
            raise ValueError(f"model window {self.window} leaves no room for text tokens")
        # the tokenizer needs stride < capacity; half a window of overlap already gives every
        # token a window where it has >= stride/2 tokens of context on each side
        self.stride = min(stride, capacity // 2)
        # the pipeline's subword rule: exact for word-aware (WordPiece "##") tokenizers,
        # a whitespace heuristic otherwise
        backend = getattr(self.tokenizer, "_tokenizer", None)
        self.word_aware = bool(backend is not None and getattr(backend.model, "continuing_subword_prefix", None))
        self.unk_id = self.tokenizer.unk_token_id

    def encode(self, doc: Doc) -> list[Feature]:
        w = tokenize_windows(self.tokenizer, doc.text, self.window, self.stride)
        return [Feature(0, ids, w["types"][k] if w["types"] is not None else None,
                        {"window": k, "offsets": w["offsets"][k], "positions": w["positions"][k].tolist()})
                for k, ids in enumerate(w["ids"])]

    def forward(self, feats: Sequence[Feature]) -> list[np.ndarray]:
        logits = self.run_encoder(feats).logits.float().cpu().numpy()
        return [np.ascontiguousarray(logits[i, :f.length], dtype=np.float32) for i, f in enumerate(feats)]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[np.ndarray]) -> list[dict]:
        order = sorted(range(len(feats)), key=lambda i: feats[i].meta["window"])
        feats = [feats[i] for i in order]
        outs = [outs[i] for i in order]
        seq = stitch_windows([np.asarray(f.meta["positions"]) for f in feats], outs,
                             [f.input_ids for f in feats], [f.meta["offsets"] for f in feats])
        tokens = self.tokenizer.convert_ids_to_tokens([int(i) for i in seq["input_ids"]])
        return decode_entities(doc.text, seq["input_ids"], tokens, seq["logits"], seq["offsets"],
                               self.id2label, self.aggregation, self.ignore_labels,
                               unk_id=self.unk_id, word_aware=self.word_aware, words=self.words,
                               drop_punctuation=self.drop_punctuation, stop_words=self.stop_words)


# --- windows ---------------------------------------------------------------------------------

def window_positions(special_masks: Sequence[Sequence[int]], stride: int,
                     offsets: Sequence[Sequence[tuple[int, int]]] | None = None) -> list[np.ndarray]:
    """Document token index of every position of every window (-1 for special tokens).

    Windows are those of a fast tokenizer with `return_overflowing_tokens`: consecutive windows
    share `stride` text tokens, so window k+1 starts `len_k - stride` text tokens after window k.
    With `offsets`, the shared tokens are checked to carry the same character offsets.
    """
    result: list[np.ndarray] = []
    start = 0
    seen: dict[int, tuple[int, int]] = {}
    for k, mask in enumerate(special_masks):
        mask = np.asarray(mask, dtype=bool)
        pos = np.full(len(mask), -1, dtype=np.int64)
        n_text = int((~mask).sum())
        pos[~mask] = np.arange(start, start + n_text)
        if offsets is not None:
            for j in np.flatnonzero(~mask):
                off = tuple(offsets[k][j])
                prev = seen.setdefault(int(pos[j]), off)
                if prev != off:
                    raise ValueError(f"window {k} does not overlap the previous one by {stride} tokens")
        result.append(pos)
        if k + 1 < len(special_masks):
            start += n_text - stride
            if n_text <= stride or start < 0:
                raise ValueError(f"window {k} has {n_text} text tokens, not more than the stride {stride}")
    return result


def centrality(n: int) -> np.ndarray:
    """Distance of each of n consecutive positions from the nearer edge of their run."""
    i = np.arange(n)
    return np.minimum(i, n - 1 - i)


def choose_windows(positions: Sequence[np.ndarray], n_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every document token, the window where it is most central and its position there.

    `positions[k][j]` is the document token at position j of window k (-1 for special tokens).
    Centrality counts text tokens only (special tokens are not context). Ties go to the earlier
    window. Returns `(window, position)` arrays of length `n_tokens`.
    """
    if n_tokens is None:
        n_tokens = max((int(p.max()) + 1 for p in positions if len(p)), default=0)
    best_c = np.full(n_tokens, -1, dtype=np.int64)
    best_w = np.full(n_tokens, -1, dtype=np.int64)
    best_j = np.full(n_tokens, -1, dtype=np.int64)
    for k, pos in enumerate(positions):
        pos = np.asarray(pos, dtype=np.int64)
        js = np.flatnonzero(pos >= 0)
        if len(js) == 0:
            continue
        tok = pos[js]
        c = centrality(len(js))
        better = c > best_c[tok]  # strict: ties keep the earlier window
        best_c[tok[better]] = c[better]
        best_w[tok[better]] = k
        best_j[tok[better]] = js[better]
    if (best_w < 0).any():
        missing = int(np.flatnonzero(best_w < 0)[0])
        raise ValueError(f"token {missing} of the document is in no window")
    return best_w, best_j


def stitch_windows(positions: Sequence[np.ndarray], window_logits: Sequence[np.ndarray],
                   window_ids: Sequence[Sequence[int]], window_offsets: Sequence[Sequence[tuple[int, int]]]) -> dict:
    """Assemble one sequence of the document's text tokens from its windows.

    Each token takes its logits from the window chosen by `choose_windows`. Returns a dict with
    `input_ids` [n], `offsets` [n, 2], `logits` [n, num_labels] (float32), `window` [n] and
    `position` [n] (where each token's logits came from).
    """
    positions = [np.asarray(p, dtype=np.int64) for p in positions]
    win, pos = choose_windows(positions)
    n = len(win)
    num_labels = int(np.asarray(window_logits[0]).shape[-1]) if len(window_logits) else 0
    logits = np.zeros((n, num_labels), dtype=np.float32)
    ids = np.zeros(n, dtype=np.int64)
    offsets = np.zeros((n, 2), dtype=np.int64)
    for k in range(len(positions)):
        sel = np.flatnonzero(win == k)
        if len(sel) == 0:
            continue
        j = pos[sel]
        logits[sel] = np.asarray(window_logits[k], dtype=np.float32)[j]
        ids[sel] = np.asarray(window_ids[k], dtype=np.int64)[j]
        offsets[sel] = np.asarray(window_offsets[k], dtype=np.int64).reshape(-1, 2)[j]
    return {"input_ids": ids, "offsets": offsets, "logits": logits, "window": win, "position": pos}


# --- decoding: the HF TokenClassificationPipeline rules (transformers 5.23) -------------------

def token_scores(logits: np.ndarray) -> np.ndarray:
    """Softmax over labels in float32, computed as the pipeline does."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.size == 0:
        return logits
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def gather_pre_entities(text: str, input_ids: Sequence[int], tokens: Sequence[str], scores: np.ndarray,
                        offsets: Sequence[tuple[int, int]], special_mask: Sequence[int] | None = None,
                        unk_id: int | None = None, word_aware: bool = True) -> list[dict]:
    """One dict per non-special token: word, scores, start, end, index, is_subword.

    Subword rule of the pipeline: for a word-aware tokenizer (WordPiece "##" prefix) a token is a
    subword when its token string and its slice of the text differ in length ("##ing" vs "ing");
    otherwise the fallback heuristic "no space just before the token". An unknown token
    ([UNK]) is never a subword.
    """
    pre = []
    for idx in range(len(input_ids)):
        if special_mask is not None and special_mask[idx]:
            continue
        start, end = int(offsets[idx][0]), int(offsets[idx][1])
        word = tokens[idx]
        word_ref = text[start:end]
        if word_aware:
            is_subword = len(word) != len(word_ref)
        else:
            is_subword = start > 0 and " " not in text[start - 1:start + 1]
        if unk_id is not None and int(input_ids[idx]) == unk_id:
            word = word_ref
            is_subword = False
        pre.append({"word": word, "scores": scores[idx], "start": start, "end": end, "index": idx,
                    "is_subword": is_subword})
    return pre


def whitespace_words(text: str, pre_entities: Sequence[dict]) -> list[dict]:
    """The pre-entities with `is_subword` set so that a word is a run of tokens with no whitespace
    between them, less the punctuation tokens at the run's ends and a possessive 's (or ’s).

    Why: the pipeline's rule for WordPiece tokenizers makes every punctuation mark a word of its
    own, so under first | average | max "O'Neill" is three words ("O", "'", "Neill") and
    "£1,000" three ("£1", ",", "000"); a model that tags the apostrophe or the comma O cuts the
    entity into fragments. Here the first token of "O'Neill" labels the whole word, as "##" pieces
    do in the pipeline; "(BBC)" is still "(", "BBC", ")" and "Blair's" is "Blair", "'", "s".
    """
    out = [dict(p) for p in pre_entities]
    runs: list[list[dict]] = []
    for p in out:
        p["is_subword"] = False
        if runs and not any(ch.isspace() for ch in text[runs[-1][-1]["end"]:p["start"]]):
            runs[-1].append(p)
        else:
            runs.append([p])
    for run in runs:
        core = [i for i, p in enumerate(run) if any(ch.isalnum() for ch in text[p["start"]:p["end"]])]
        if not core:
            continue
        a, b = core[0], core[-1]
        last = text[run[b]["start"]:run[b]["end"]].lower()
        if b > a and last in ("'s", "\u2019s"):
            b -= 1
        elif b - a >= 2 and last == "s" and text[run[b - 1]["start"]:run[b - 1]["end"]] in ("'", "\u2019"):
            b -= 2
        for p in run[a + 1:b + 1]:
            p["is_subword"] = True
    return out


def aggregate_word(entities: Sequence[dict], aggregation: str, id2label: Mapping[int, str]) -> dict:
    """Give one label to the tokens of one word (first | average | max)."""
    if aggregation == "first":
        scores = entities[0]["scores"]
        idx = int(scores.argmax())
        score = scores[idx]
    elif aggregation == "max":
        scores = max(entities, key=lambda e: e["scores"].max())["scores"]
        idx = int(scores.argmax())
        score = scores[idx]
    elif aggregation == "average":
        scores = np.nanmean(np.stack([e["scores"] for e in entities]), axis=0)
        idx = int(scores.argmax())
        score = scores[idx]
    else:
        raise ValueError(f"invalid word aggregation {aggregation!r}")
    return {"entity": id2label[idx], "score": score, "start": entities[0]["start"], "end": entities[-1]["end"]}


def aggregate_words(pre_entities: Sequence[dict], aggregation: str, id2label: Mapping[int, str]) -> list[dict]:
    """Group tokens into words (a word = a token followed by its subwords), one entity per word."""
    if aggregation not in WORD_AGGREGATIONS:
        raise ValueError("none and simple strategies are invalid for word aggregation")
    words: list[dict] = []
    group: list[dict] = []
    for e in pre_entities:
        if group and not e["is_subword"]:
            words.append(aggregate_word(group, aggregation, id2label))
            group = []
        group.append(e)
    if group:
        words.append(aggregate_word(group, aggregation, id2label))
    return words


def get_tag(label: str) -> tuple[str, str]:
    """("B" | "I", tag); a label without a B-/I- prefix counts as a continuation."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def group_sub_entities(entities: Sequence[dict]) -> dict:
    """Merge adjacent tokens/words into one entity: mean score, span of first start to last end."""
    return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": np.mean(np.nanmean([e["score"] for e in entities])),
            "start": entities[0]["start"], "end": entities[-1]["end"]}


def group_entities(entities: Sequence[dict]) -> list[dict]:
    """Merge runs with the same tag where each follower is not a B- (B-PER I-PER -> PER)."""
    groups: list[dict] = []
    current: list[dict] = []
    for e in entities:
        if current:
            bi, tag = get_tag(e["entity"])
            _, last_tag = get_tag(current[-1]["entity"])
            if not (tag == last_tag and bi != "B"):
                groups.append(group_sub_entities(current))
                current = []
        current.append(e)
    if current:
        groups.append(group_sub_entities(current))
    return groups


def aggregate(pre_entities: Sequence[dict], aggregation: str, id2label: Mapping[int, str]) -> list[dict]:
    """Pre-entities -> entities ("entity" per token for none, "entity_group" otherwise)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {aggregation!r}")
    if aggregation in ("none", "simple"):
        entities = []
        for pre in pre_entities:
            idx = int(pre["scores"].argmax())
            entities.append({"entity": id2label[idx], "score": pre["scores"][idx], "index": pre["index"],
                             "start": pre["start"], "end": pre["end"]})
    else:
        entities = aggregate_words(pre_entities, aggregation, id2label)
    if aggregation == "none":
        return entities
    return group_entities(entities)


def is_trivial(text: str, drop_punctuation: bool, stop_words) -> bool:
    """An entity nobody would call one: no letter or digit (with drop_punctuation), or a stop word alone."""
    if drop_punctuation and not any(ch.isalnum() for ch in text):
        return True
    return text.strip().lower() in stop_words


def filter_ignored(entities: Sequence[dict], ignore_labels: Sequence[str]) -> list[dict]:
    """Drop entities whose "entity" (none) or "entity_group" (grouped) is an ignored label."""
    return [e for e in entities
            if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]


def decode_entities(text: str, input_ids: Sequence[int], tokens: Sequence[str], logits: np.ndarray,
                    offsets: Sequence[tuple[int, int]], id2label: Mapping[int, str], aggregation: str = "simple",
                    ignore_labels: Sequence[str] = ("O",), special_mask: Sequence[int] | None = None,
                    unk_id: int | None = None, word_aware: bool = True, words: str = "pipeline",
                    drop_punctuation: bool = False, stop_words: Sequence[str] = ()) -> list[dict]:
    """Logits of one token sequence -> entity rows of the `entities` table.

    Rows: entity_group, text (= text[start_char:end_char]), start_char, end_char, score. With the
    defaults (words "pipeline", nothing dropped) these are the HF pipeline's entities.
    """
    if words not in WORD_RULES:
        raise ValueError(f"words must be one of {', '.join(WORD_RULES)}, not {words!r}")
    scores = token_scores(logits)
    pre = gather_pre_entities(text, input_ids, tokens, scores, offsets, special_mask, unk_id, word_aware)
    if words == "whitespace":
        if aggregation not in WORD_AGGREGATIONS:
            raise ValueError(f"words = 'whitespace' needs aggregation first, average or max, not {aggregation!r}")
        pre = whitespace_words(text, pre)
    entities = filter_ignored(aggregate(pre, aggregation, id2label), list(ignore_labels))
    stop = {w.lower() for w in stop_words}
    rows = []
    for e in entities:
        start, end = int(e["start"]), int(e["end"])
        if is_trivial(text[start:end], drop_punctuation, stop):
            continue
        rows.append({"entity_group": e.get("entity_group", e.get("entity")), "text": text[start:end],
                     "start_char": start, "end_char": end, "score": float(e["score"])})
    return rows

