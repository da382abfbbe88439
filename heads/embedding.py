"""Sentence embeddings: `AutoModel` hidden states pooled the way the model folder declares.

A sentence-transformers folder says how to pool (`modules.json`, `1_Pooling/config.json`: mean, CLS
or max), whether to L2-normalise (a `Normalize` module) and its window (`max_seq_length` in
`sentence_bert_config.json`, 256 for all-MiniLM-L6-v2); a plain HF folder gets mean pooling, the
model's own length limit and `normalize = false` (what sentence-transformers does with such a
folder). The `pooling`, `normalize` and `max_seq_length` params override the folder; the head
records the values it resolved in its params, so they are part of the model id: a folder whose
pooling changes is a new model, and its documents are embedded again.

Long documents are never cut: they are split into windows of the window size (with special
tokens; `stride` tokens of overlap). The document row (`window = -1`) is the token-weighted mean of
the windows' pooled, un-normalised vectors, normalised afterwards when the model normalises; for
mean pooling with `stride = 0` that is exactly the mean over every token of the document. A document
that fits one window gets the same single `window = -1` row, equal to what sentence-transformers'
`encode` returns for it. `per_window = true` writes one row per window instead (`window` 0..n-1,
each normalised like a document vector), for passage-level search.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from transformers import AutoModel

from core.config import DEFAULT_BATCH_TOKENS

from .base import Doc, Feature, Head, HeadParams, ResultTable

POOLING = ("mean", "cls", "max")
_ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


EMBEDDINGS = ResultTable(
    "embeddings",
    # a list column (not FLOAT[dim]): heads of different sizes share the table, and it works on every
    # storage backend; `window` is -1 for a document's vector, 0..n-1 for per-window rows (a reserved
    # word in SQL: write "window" in queries)
    (pa.field("window", pa.int32()), pa.field("dim", pa.int32()),
     pa.field("embedding", pa.list_(pa.float32())), pa.field("n_tokens", pa.int64())),
    upstream=None,  # vectors: nothing to route on (depends_on still orders heads)
    doc="one vector per document (or per window with per_window)")


class EmbeddingParams(HeadParams):
    # "auto" / None / 0: as the model folder declares (see the module docstring)
    pooling: Literal["auto", "mean", "cls", "max"] = "auto"
    """auto (as the folder declares; plain folder: mean) | mean | cls | max"""
    normalize: bool | None = None
    """L2-normalise the vectors (default: as the folder declares; plain folder: false)"""
    max_seq_length: Annotated[int, Field(ge=0)] = 0
    """window in tokens; 0 = the folder's max_seq_length, else the model's limit"""
    stride: Annotated[int, Field(ge=0)] = 0
    """token overlap between windows of a long document"""
    per_window: bool = False
    """true: one row per window (window 0..n-1) instead of one per document"""


class EmbeddingHead(Head):
    task = "embedding"
    table = "embeddings"
    tables = (EMBEDDINGS,)
    model_class = AutoModel
    Params = EmbeddingParams

    def setup(self) -> None:
        declared = _declared(self.name, _model_files(self.model))
        # resolved values become the head's params: they are part of its model id (models.params)
        self.p = resolve_params(self.name, self.p, declared, self.max_length())
        self.window = int(self.p["max_seq_length"])
        self.lowercase = bool(declared.get("do_lower_case", False))
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def params_from_files(cls, name: str, p, folder) -> dict:
        """What `setup` resolves, from the folder's files: the model's limit is the smaller of the
        tokenizer's `model_max_length` and the config's position embeddings, as `Head.max_length`."""
        return resolve_params(name, p, _declared(name, _model_files_at(str(folder))), _files_max_length(Path(folder)))

    # --- the contract ----------------------------------------------------------------------
    def encode(self, doc: Doc) -> list[Feature]:
        return self._windows(doc.text)

    def _windows(self, text: str) -> list[Feature]:
        text = text.lower() if self.lowercase else text
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        stride = min(int(self.p["stride"]), max((self.window - specials) // 2, 0))
        enc = self.tokenizer(text, truncation=True, max_length=self.window, stride=stride,
                             return_overflowing_tokens=True)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        if not ids or not isinstance(ids[0], list):
            ids, types = [ids], [types] if types is not None else None
        return [Feature(0, list(w), list(types[k]) if types is not None else None, {"window": k})
                for k, w in enumerate(ids)]

    def forward(self, feats: Sequence[Feature]) -> list[tuple[np.ndarray, int]]:
        """Pooled, not yet normalised vector (float32) and token count of each window."""
        batch = self.collate(feats)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            pooled = pool(hidden, batch["attention_mask"], self.p["pooling"])
        vectors = pooled.float().cpu().numpy()
        return [(vectors[i], f.length) for i, f in enumerate(feats)]

    def decode(self, doc: Doc, feats: Sequence[Feature], outs: Sequence[tuple[np.ndarray, int]]) -> list[dict]:
        order = sorted(range(len(feats)), key=lambda j: feats[j].meta["window"])
        vectors = np.stack([outs[j][0] for j in order])
        tokens = [int(outs[j][1]) for j in order]
        return decode_embedding(vectors, tokens, self.p["normalize"], self.p["per_window"])

    # --- for search: the same vectors for texts given directly (a query) --------------------
    def embed(self, texts: Sequence[str], token_budget: int = DEFAULT_BATCH_TOKENS) -> np.ndarray:
        """Document vectors (the window = -1 rows) of `texts`, through the engine; raises on a failure.

        A per-window head embeds a query as a document too, so it is comparable with each window."""
        import copy

        from .engine import pipe

        head = self
        if self.p["per_window"]:
            head = copy.copy(self)  # shares model and tokenizer
            head.p = {**self.p, "per_window": False}
        out = []
        for k, r in enumerate(pipe(head, [Doc(str(k), t) for k, t in enumerate(texts)], token_budget=token_budget)):
            if r.error is not None:
                raise ValueError(f"heads.{self.name}: cannot embed text {k}: {r.error}")
            out.append(np.asarray(r.rows[0]["embedding"], dtype=np.float32))
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence-transformers pooling over right-padded hidden states (accumulated in float32)."""
    h = hidden.float()
    if mode == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1).to(h.dtype)
    if mode == "mean":
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if mode == "max":
        return h.masked_fill(m == 0, float("-inf")).max(dim=1).values
    raise ValueError(f"unknown pooling {mode!r}")


def decode_embedding(vectors: np.ndarray, tokens: Sequence[int], normalize: bool,
                     per_window: bool = False) -> list[dict]:
    """Rows of one document from its windows' pooled vectors (window order) and token counts.

    Document row: token-weighted mean of the un-normalised window vectors, then L2-normalised when
    the model normalises. `per_window`: one row per window, each normalised the same way.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    dim = int(vectors.shape[1])
    if per_window:
        return [{"window": k, "dim": dim, "embedding": _finish(v, normalize), "n_tokens": int(n)}
                for k, (v, n) in enumerate(zip(vectors, tokens))]
    w = np.asarray(tokens, dtype=np.float64)
    mean = (vectors * w[:, None]).sum(axis=0) / w.sum()
    return [{"window": -1, "dim": dim, "embedding": _finish(mean, normalize), "n_tokens": int(w.sum())}]


def _finish(v: np.ndarray, normalize: bool) -> np.ndarray:
    """The stored vector: float32 (an array, not a list: Arrow converts it 16x faster when staging)."""
    if normalize:
        norm = float(np.linalg.norm(v))
        v = v / max(norm, 1e-12)  # F.normalize's epsilon
    return v.astype(np.float32)


def resolve_params(name: str, p, declared: dict, limit: int) -> dict:
    """The head's params with `auto` pooling, unset normalisation and window resolved (as the folder
    declares, else the defaults), checked against the model's limit."""
    pooling = p["pooling"] if p["pooling"] != "auto" else declared.get("pooling", "mean")
    if pooling not in POOLING:
        raise ValueError(f"heads.{name}: pooling {pooling!r} declared by the model folder is not "
                         f"supported (supported: {', '.join(POOLING)})")
    normalize = p["normalize"] if p["normalize"] is not None else declared.get("normalize", False)
    window = p["max_seq_length"] or declared.get("max_seq_length") or limit
    if window > limit:
        raise ValueError(f"heads.{name}: max_seq_length {window} exceeds the model's limit of {limit} tokens")
    if window < 3:
        raise ValueError(f"heads.{name}: max_seq_length {window} leaves no room for text")
    return {**p, "pooling": pooling, "normalize": bool(normalize), "max_seq_length": int(window)}


def _declared(name: str, files: dict) -> dict:
    try:
        return sentence_transformers_settings(files)
    except ValueError as exc:
        raise ValueError(f"heads.{name}: {exc}") from None


def _files_max_length(folder: Path) -> int:
    """`base.model_max_length` of the model in `folder`, from tokenizer_config.json and config.json."""
    tok = _read_json(str(folder), "tokenizer_config.json") or {}
    cfg = _read_json(str(folder), "config.json") or {}
    limits = []
    tok_max = tok.get("model_max_length", tok.get("max_len"))
    if isinstance(tok_max, int) and not isinstance(tok_max, bool) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    pos = cfg.get("max_position_embeddings")
    if isinstance(pos, int) and not isinstance(pos, bool) and pos > 0:
        offset = 2 if cfg.get("model_type", "") in {"roberta", "xlm-roberta", "camembert"} else 0
        limits.append(pos - offset)
    return min(limits) if limits else 512


def _model_files(model: Any) -> dict[str, dict | list | None]:
    """The sentence-transformers files of the folder (or hub snapshot) the model came from; None when absent."""
    return _model_files_at(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", ""))


def _model_files_at(source: str) -> dict[str, dict | list | None]:
    names = ["modules.json", "sentence_bert_config.json"]
    modules = _read_json(source, "modules.json")
    pooling_dir = next((m.get("path") for m in modules or [] if str(m.get("type", "")).endswith(".Pooling")), None)
    files: dict[str, Any] = {n: _read_json(source, n) for n in names[1:]}
    files["modules.json"] = modules
    files["pooling"] = _read_json(source, f"{pooling_dir}/config.json") if pooling_dir else None
    return files


def _read_json(source: str, name: str):
    path = Path(source) / name
    if not path.is_file():
        if Path(source).is_dir():
            return None
        try:  # a hub id: the file of the cached snapshot, if the repository has it
            from transformers.utils import cached_file

            found = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except Exception:
            return None
        if not found:
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable sentence-transformers file ({exc})") from None


def sentence_transformers_settings(files: dict) -> dict:
    """What a sentence-transformers folder declares: pooling, normalize, max_seq_length, do_lower_case.

    Empty for a plain HF folder. Modules this head cannot reproduce (Dense projections, ...) are
    refused, since the vectors would silently differ from the model's.
    """
    out: dict[str, Any] = {}
    modules = files.get("modules.json")
    if modules:
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unsupported:
            raise ValueError(f"modules.json: module {unsupported[0]!r} is not supported (an embedding head "
                             "reproduces Transformer, Pooling and Normalize)")
        out["normalize"] = "Normalize" in kinds
        if "Pooling" in kinds:
            out["pooling"] = _pooling_mode(files.get("pooling") or {})
    bert = files.get("sentence_bert_config.json") or {}
    if bert.get("max_seq_length"):
        out["max_seq_length"] = int(bert["max_seq_length"])
    if bert.get("do_lower_case"):
        out["do_lower_case"] = True
    return out


def _pooling_mode(cfg: dict) -> str:
    """The one pooling mode of a 1_Pooling/config.json (old boolean keys or the newer `pooling_mode`)."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [m for k, m in _ST_POOLING_KEYS.items() if cfg.get(k)] or ["mean"]
    if cfg.get("include_prompt") is False:
        raise ValueError("1_Pooling/config.json: include_prompt = false is not supported")
    if len(modes) != 1:
        raise ValueError(f"1_Pooling/config.json: combined pooling modes {modes} are not supported")
    return modes[0]
