"""Semantic search and near-duplicate detection over a head's stored embeddings.

The query is embedded by the head's own current model, loaded from what `models` recorded (source,
revision, params, dtype); its model id is recomputed and must equal the stored one, so a model
folder that changed on disk since the run is refused rather than compared across models. Ranking
and text lookup are SQL in `storage.search`; this module only joins the head and the storage.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

# imports of storage, heads, numpy and pyarrow wait for a search: the CLI parser imports this module

_IDENTITY: dict[tuple, str] = {}  # (head config key, weight files' stat) -> model id: hash weights once


def query_head(database: str, head: str, model: dict | None = None):
    """The loaded head that made the stored vectors (checked by model id), and its `models` row."""
    from heads.loading import RESIDENT, ModelLoadError, cached_head, model_identity
    from pipeline.config import HeadConfig
    from storage.search import SearchError, current_model

    model = model or current_model(database, head)
    if model["task"] != "embedding":
        raise SearchError(f"head {head!r} is a {model['task']} head, not an embedding head")
    cfg = HeadConfig(name=head, task="embedding", model=model["source"], revision=model["revision"],
                     dtype=model["dtype"], params=model["params"])
    try:
        loaded = cached_head(cfg)
    except (ModelLoadError, ValueError, OSError) as exc:
        raise SearchError(f"head {head!r}: cannot load its model {model['source']!r}: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    key = (RESIDENT.key(cfg), _stat(model["source"]))
    if key not in _IDENTITY:
        _IDENTITY[key] = model_identity(cfg, loaded)["model_id"]
    if _IDENTITY[key] != model["model_id"]:
        raise SearchError(f"head {head!r}: the model at {model['source']} is now model {_IDENTITY[key]}, the stored "
                          f"vectors are from model {model['model_id']} (the model changed since the run); "
                          "run the pipeline again to re-embed")
    return loaded, model


def _stat(source: str) -> tuple:
    folder = Path(source)
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()))


def corpus_of(model: dict):
    """The corpus the head's rows came from, with the id and text columns of the config that ran it."""
    from storage.search import CorpusRef

    id_column, text_column = "id", "text"
    for path in model["configs"]:
        try:
            import tomllib
        except ImportError:  # pragma: no cover
            import tomli as tomllib
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        id_column, text_column = raw.get("id_column", id_column), raw.get("text_column", text_column)
        break
    return CorpusRef(tuple(model["corpora"]), id_column, text_column)


def search(database: str | os.PathLike, query: str, head: str, k: int = 10, where: str | None = None,
           approximate: bool = False):
    """The k documents most similar to `query` under `head`: an Arrow table of doc_id, score (cosine
    similarity), text. `where`: an SQL predicate over corpus columns and doc_id, window, n_tokens.
    `approximate`: an in-memory HNSW index (DuckDB vss) instead of the exact scan, when it loads."""
    import pyarrow as pa

    from storage.search import SearchError, rank, texts

    database = str(database)
    if not isinstance(query, str) or not query.strip():
        raise SearchError("query: empty text")
    loaded, model = query_head(database, head)
    vec = loaded.embed([query])[0]
    corpus = corpus_of(model)
    if approximate:
        if where is not None:
            raise SearchError("--approximate cannot be combined with --where (the index ranks every vector)")
        from storage.search import HnswIndex

        index = HnswIndex(database, head)
        try:
            hits = index.query(vec, k)
        finally:
            index.close()
    else:
        hits = rank(database, head, vec, k=k, where=where, corpus=corpus)
    ids = hits.column("doc_id").to_pylist()
    try:
        found = texts(corpus, ids)
    except SearchError as exc:
        warnings.warn(f"text unavailable: {exc}", stacklevel=2)
        found = {}
    return pa.table({"doc_id": pa.array(ids, pa.string()),
                     "score": pa.array(hits.column("score").to_pylist(), pa.float64()),
                     "text": pa.array([found.get(i) for i in ids], pa.string())})


def near_duplicates(database: str | os.PathLike, head: str, min_similarity: float = 0.95):
    """Pairs of documents whose vectors have cosine similarity >= min_similarity: an Arrow table of
    doc_a < doc_b (each pair once, most similar first), similarity.

    Exact, without an SQL cross join: blocked matrix products over the document vectors (see
    `similar_pairs`). An HNSW index does not help here: DuckDB's vss uses it only for a query with a
    constant vector, so neighbours of every document would be one index query each, measured slower
    (benchmarks/embeddings.py)."""
    from storage.search import SearchError, current_model, vectors

    database = str(database)
    if not -1.0 <= min_similarity <= 1.0:
        raise SearchError("--min-similarity must be between -1 and 1")
    model = current_model(database, head)
    if model["params"].get("per_window"):
        raise SearchError(f"head {head!r} stores one row per window (per_window = true); near-duplicates "
                          "compares document vectors")
    ids, mat = vectors(database, head)
    ia, ib, sim = similar_pairs(mat, min_similarity)
    a = [ids[i] for i in ia]
    b = [ids[j] for j in ib]
    return _pairs_table([min(x, y) for x, y in zip(a, b)], [max(x, y) for x, y in zip(a, b)], sim.tolist())


def _pairs_table(a: list, b: list, s: list):
    import pyarrow as pa

    return pa.table({"doc_a": pa.array(a, pa.string()), "doc_b": pa.array(b, pa.string()),
                     "similarity": pa.array(s, pa.float64())})


def similar_pairs(mat, min_similarity: float, block_cells: int = 1 << 24):
    """All index pairs i < j with cosine(mat[i], mat[j]) >= min_similarity, most similar first.

    Exact: the upper triangle of the similarity matrix, computed block by block with float32 matrix
    products (memory bounded by `block_cells`; no pair materialised unless it passes the threshold).
    """
    import numpy as np
    import torch

    n = mat.shape[0]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if n < 2:
        return empty
    x = torch.from_numpy(np.ascontiguousarray(mat, dtype=np.float32))
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    rows = max(1, min(n, block_cells // n))
    found_i, found_j, found_s = [], [], []
    with torch.inference_mode():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            sims = x[start:stop] @ x[start:].T  # rows start..stop against start..n: column c is j = start + c
            square = sims[:, :stop - start]  # j <= i lies in this square's lower triangle: never a pair
            square.masked_fill_(torch.ones_like(square, dtype=torch.bool).tril_(), float("-inf"))
            hit = (sims >= min_similarity).nonzero()
            if len(hit):
                found_i.append(hit[:, 0] + start)
                found_j.append(hit[:, 1] + start)
                found_s.append(sims[hit[:, 0], hit[:, 1]])
    if not found_i:
        return empty
    i, j, s = torch.cat(found_i).numpy(), torch.cat(found_j).numpy(), torch.cat(found_s).double().numpy()
    order = np.lexsort((j, i, -s))
    return i[order], j[order], s[order]


# --- command line ------------------------------------------------------------------------------------

def cmd_search(args: Any) -> int:
    from storage.db import DatabaseBusy
    from storage.search import SearchError

    from .cli import format_table

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = search(args.db, args.query, args.head, k=args.k, where=args.where, approximate=args.approximate)
        for w in caught:
            print(f"taskheads: {w.message}", file=sys.stderr)
    except SearchError as exc:
        print(f"taskheads: search: {exc}", file=sys.stderr)
        return 2
    except DatabaseBusy as exc:
        print(f"taskheads: {exc}; try again when the run's load finishes", file=sys.stderr)
        return 1
    print(format_table(table.column_names, [tuple(r.values()) for r in table.to_pylist()], max_width=100))
    return 0


def cmd_near_duplicates(args: Any) -> int:
    from storage.db import DatabaseBusy
    from storage.search import SearchError

    from .cli import format_table

    try:
        table = near_duplicates(args.db, args.head, min_similarity=args.min_similarity)
    except SearchError as exc:
        print(f"taskheads: near-duplicates: {exc}", file=sys.stderr)
        return 2
    except DatabaseBusy as exc:
        print(f"taskheads: {exc}; try again when the run's load finishes", file=sys.stderr)
        return 1
    rows = [tuple(r.values()) for r in table.slice(0, args.limit).to_pylist()] if args.limit else \
        [tuple(r.values()) for r in table.to_pylist()]
    print(format_table(table.column_names, rows))
    if args.limit and table.num_rows > args.limit:
        print(f"({table.num_rows} pairs in all; --limit 0 lists every one)")
    return 0


def add_commands(sub) -> None:
    """The `search` and `near-duplicates` subcommands of the taskheads CLI."""
    s = sub.add_parser("search", help="rank documents by similarity to a query text (an embedding head's vectors)")
    s.add_argument("db")
    s.add_argument("query", help="query text, embedded with the head's model")
    s.add_argument("--head", required=True, help="the embedding head whose vectors to search")
    s.add_argument("-k", type=int, default=10, help="documents to return (default 10)")
    s.add_argument("--where", help="SQL predicate over corpus columns and doc_id, window, n_tokens")
    s.add_argument("--approximate", action="store_true", help="HNSW index (DuckDB vss) instead of the exact scan")
    s.set_defaults(func=cmd_search)
    n = sub.add_parser("near-duplicates", help="pairs of documents whose embeddings are nearly the same")
    n.add_argument("db")
    n.add_argument("--head", required=True, help="the embedding head whose vectors to compare")
    n.add_argument("--min-similarity", type=float, default=0.95, help="cosine similarity threshold (default 0.95)")
    n.add_argument("--limit", type=int, default=100, help="pairs to print (0: all; default 100)")
    n.set_defaults(func=cmd_near_duplicates)
