"""Vector search over stored embeddings, in DuckDB: exact ranking, corpus text, an optional HNSW index.

Only the vectors of a head's current model are ranked (`latest_embeddings`), so rows an older model
made are never compared with a query embedded by the new one. The query vector, head names, ids
and texts are always parameters; the only SQL text from outside is a `--where` filter, and it goes
through `checked_filter` (one expression, no subquery) before it is placed in a query.

The database never stores document text: it is read back from the corpus the producing runs
recorded (`runs.corpus`), by id. Storage only: the query vector is computed by the caller
(taskheads.search), which loads the head.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute below: a bare `import pyarrow` does not load it)

from core.names import quote

from .db import connect, exists
from .lake import is_lake, readable_paths
from .sandbox import check_expression, literal_path, lock_down, sql_string


class SearchError(Exception):
    """A search that cannot run; the message says why in one line."""


@dataclass(frozen=True)
class CorpusRef:
    """Where a head's documents came from: the corpus spec(s) of its runs and their id/text columns."""

    specs: tuple[str, ...]
    id_column: str = "id"
    text_column: str = "text"

    def files(self) -> list[str]:
        from .corpus import CorpusError, corpus_files

        out: list[str] = []
        for spec in self.specs:
            try:
                out += [f for f in corpus_files(spec) if f not in out]
            except CorpusError:
                continue
        return out


def checked_filter(sql: str) -> str:
    """The one gate for user SQL in a search: the sandbox's single-expression check (DuckDB's parser:
    no statement, no subquery, no file access); returns the expression to place in a WHERE clause."""
    if not isinstance(sql, str) or not sql.strip():
        raise SearchError("--where: empty filter")
    try:
        return check_expression(sql)
    except ValueError as exc:
        raise SearchError(f"--where: {exc}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _open(database: str, wait_seconds: float) -> duckdb.DuckDBPyConnection:
    if not exists(database):
        raise SearchError(f"database not found: {database}")
    con = connect(database, read_only=True, wait_seconds=wait_seconds)
    if not con.execute("SELECT 1 FROM duckdb_views() WHERE view_name = 'latest_embeddings'").fetchall():
        con.close()
        raise SearchError(f"{database}: no embeddings (no embedding head has run on this database)")
    return con


def current_model(database: str, head: str, wait_seconds: float = 30.0) -> dict:
    """The head's current model (the one `latest_embeddings` shows) as stored in `models`, with the
    corpus its rows came from and the config that ran it."""
    con = _open(database, wait_seconds)
    try:
        row = con.execute(
            "SELECT m.model_id, m.task, m.source, m.revision, m.params, m.dtype, count(*) AS n "
            "FROM latest_embeddings e JOIN models m USING (model_id) WHERE e.head = ? GROUP BY ALL", [head]).fetchall()
        if not row:
            heads = [r[0] for r in con.execute("SELECT DISTINCT head FROM embeddings ORDER BY 1").fetchall()]
            raise SearchError(f"head {head!r} has no embeddings in {database} "
                              f"(embedding heads there: {', '.join(heads) or 'none'})")
        model_id, task, source, revision, params, dtype, n = row[0]
        runs = con.execute("SELECT DISTINCT r.corpus, r.config_path FROM latest_embeddings e "
                           "JOIN runs r USING (run_id) WHERE e.head = ? ORDER BY 1, 2", [head]).fetchall()
    finally:
        con.close()
    return {"model_id": model_id, "task": task, "source": source, "revision": revision,
            "params": json.loads(params or "{}"), "dtype": dtype or "float32", "rows": n,
            "corpora": [r[0] for r in runs if r[0]], "configs": [r[1] for r in runs if r[1]]}


def _corpus_sql(corpus: CorpusRef) -> tuple[str, list]:
    """A relation of the corpus with one row per document id (its first occurrence in file order, as
    planning resolves duplicates) and the id as stored (`__doc_id`); returns (SQL, its parameters)."""
    files = corpus.files()
    if not files:
        raise SearchError(f"corpus {', '.join(corpus.specs) or '(none recorded)'}: no Parquet files found "
                          "(moved since the run?)")
    idc = f"CAST({quote(corpus.id_column)} AS VARCHAR)"
    sql = (f"(SELECT * EXCLUDE (filename, file_row_number), {idc} AS __doc_id "
           "FROM read_parquet(?::VARCHAR[], union_by_name = true, filename = true, file_row_number = true) "
           f"QUALIFY row_number() OVER (PARTITION BY {idc} "
           "ORDER BY list_position(?::VARCHAR[], filename), file_row_number) = 1)")
    return sql, [[literal_path(f) for f in files], files]  # read literally; order by the real names


def rank(database: str, head: str, query: np.ndarray, k: int = 10, where: str | None = None,
         corpus: CorpusRef | None = None, wait_seconds: float = 30.0) -> pa.Table:
    """Exact top-k by cosine similarity among the head's current vectors: (doc_id, window, score).

    A document with several rows (per-window heads) counts once, by its best window. `where` (checked
    by `checked_filter`) sees the corpus columns and doc_id, window, n_tokens.
    """
    if k < 1:
        raise SearchError("-k must be at least 1")
    vec = np.asarray(query, dtype=np.float32).ravel().tolist()
    con = _open(database, wait_seconds)
    try:
        params: list = [vec]
        source = "latest_embeddings e"
        cond = ""
        if where is not None:
            if corpus is None:
                raise SearchError("--where needs the corpus of the head's runs")
            cond = f" AND {checked_filter(where)}"
            docs, docs_params = _corpus_sql(corpus)
            files, dirs = readable_paths(con, database) if is_lake(database) else ([], [])
            lock_down(con, list(corpus.files()) + files, dirs, utc=False)  # the filter reads the corpus only
            source += f" JOIN {docs} c ON c.__doc_id = e.doc_id"
            params += docs_params
        params.append(head)
        sql = (f"SELECT e.doc_id, e.\"window\", list_cosine_similarity(e.embedding, ?::FLOAT[]) AS score "
               f"FROM {source} WHERE e.head = ?{cond}")
        sql = (f"SELECT doc_id, arg_max(\"window\", score) AS \"window\", max(score) AS score FROM ({sql}) "
               f"GROUP BY doc_id ORDER BY score DESC, doc_id LIMIT ?")
        params.append(int(k))
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            if where is not None:
                raise SearchError(f"--where {where!r}: {_first_line(exc)}") from None
            raise
    finally:
        con.close()


def texts(corpus: CorpusRef, doc_ids: Sequence[str]) -> dict[str, str]:
    """The corpus text of these documents (ids as stored), read by parameterised id."""
    if not doc_ids:
        return {}
    docs, params = _corpus_sql(corpus)
    con = lock_down(duckdb.connect(), corpus.files(), utc=False)
    try:
        rows = con.execute(f"SELECT __doc_id, CAST({quote(corpus.text_column)} AS VARCHAR) FROM {docs} "
                           "WHERE __doc_id IN (SELECT unnest(?::VARCHAR[]))", params + [list(doc_ids)]).fetchall()
    except duckdb.Error as exc:
        raise SearchError(f"corpus: cannot read text column {corpus.text_column!r} ({_first_line(exc)})") from None
    finally:
        con.close()
    return dict(rows)


def vectors(database: str, head: str, document_rows: bool = True,
            wait_seconds: float = 30.0) -> tuple[list[str], np.ndarray]:
    """The head's current vectors as a float32 matrix (document rows, window = -1, by default)."""
    con = _open(database, wait_seconds)
    try:
        cond = " AND \"window\" = -1" if document_rows else ""
        t = con.sql(f"SELECT doc_id, embedding FROM latest_embeddings WHERE head = ?{cond} ORDER BY doc_id",
                    params=[head]).to_arrow_table()
    finally:
        con.close()
    ids = t.column("doc_id").to_pylist()
    col = t.column("embedding").combine_chunks()
    if not ids:
        return ids, np.zeros((0, 0), np.float32)
    dims = set(pa.compute.list_value_length(col).unique().to_pylist())
    if len(dims) != 1:
        raise SearchError(f"head {head!r}: vectors of different sizes {sorted(dims)} under one model")
    return ids, col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), dims.pop())


# --- optional approximate index (DuckDB vss: HNSW), built in memory at query time --------------------

def load_vss(con: duckdb.DuckDBPyConnection) -> str | None:
    """Load the vss extension (installed, or shipped by the `duckdb-extension-vss` package for this
    DuckDB version); returns None when loaded, else why not in one line."""
    try:
        con.execute("LOAD vss")
        return None
    except duckdb.Error as exc:
        first = _first_line(exc)
    try:
        import duckdb_extension_vss  # type: ignore[import-not-found]

        path = (Path(duckdb_extension_vss.__file__).parent / "extensions" / f"v{duckdb.__version__}"
                / "vss.duckdb_extension")
        if not path.is_file():
            return f"the vss extension package has no build for DuckDB {duckdb.__version__} ({first})"
        con.execute(f"LOAD {sql_string(str(path))}")
        return None
    except ImportError:
        return f"the DuckDB vss extension is not available for DuckDB {duckdb.__version__} ({first})"
    except duckdb.Error as exc:
        return f"the DuckDB vss extension does not load: {_first_line(exc)}"


class HnswIndex:
    """An in-memory HNSW index (cosine) over a head's current document vectors; query many times.

    Only a query with a constant vector uses the index: vss does not use it in joins (its docs), so
    "each document's nearest neighbours" would be one query per document, slower than the exact
    blocked matrix products of near-duplicates (benchmarks/embeddings.py measures both)."""

    def __init__(self, database: str, head: str, ef_search: int = 200, wait_seconds: float = 30.0):
        ids, mat = vectors(database, head, document_rows=True, wait_seconds=wait_seconds)
        if not ids:
            raise SearchError(f"head {head!r}: no document vectors to index")
        self.con = duckdb.connect()
        problem = load_vss(self.con)
        if problem:
            self.con.close()
            raise SearchError(f"approximate search unavailable: {problem}")
        self.dim = mat.shape[1]
        self.ids = ids
        self.unit = mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        table = pa.table({"i": pa.array(np.arange(len(ids), dtype=np.int64)),  # position in `ids`
                          "v": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), self.dim)})
        self.con.register("staged_vectors", table)
        self.con.execute(f"CREATE TABLE vecs AS SELECT i, v::FLOAT[{self.dim}] AS v FROM staged_vectors")
        self.con.unregister("staged_vectors")
        self.con.execute("CREATE INDEX vecs_hnsw ON vecs USING HNSW (v) WITH (metric = 'cosine')")
        # vss's default ef_search (64) found 81-88% of the exact top 10 on clustered 384-d vectors; 200: 99%
        self.con.execute(f"SET hnsw_ef_search = {int(ef_search)}")

    def query(self, vec: np.ndarray, k: int = 10) -> pa.Table:
        """Approximate top-k: (doc_id, window, score), score the exact cosine of each hit."""
        q = np.asarray(vec, dtype=np.float32).ravel()
        # The index answers positions only, scored here (fetching ids and distances in SQL took 3x longer:
        # DuckDB joins the hits back to a scan of the table) and the vector is a literal (with a parameter the index scan was ~5x slower; vss 1.5.5). Only floats we
        # computed go into the SQL text, never user input.
        literal = "[" + ", ".join(repr(float(x)) for x in q) + f"]::FLOAT[{self.dim}]"
        rows = [r for (r,) in self.con.execute(
            f"SELECT i FROM vecs ORDER BY array_cosine_distance(v, {literal}) LIMIT ?", [int(k)]).fetchall()]
        scores = self.unit[rows] @ (q / max(float(np.linalg.norm(q)), 1e-12)) if rows else np.zeros(0)
        best = sorted(range(len(rows)), key=lambda j: (-scores[j], self.ids[rows[j]]))
        return pa.table({"doc_id": pa.array([self.ids[rows[j]] for j in best], pa.string()),
                         "window": pa.array([-1] * len(best), pa.int32()),
                         "score": pa.array([float(scores[j]) for j in best], pa.float64())})

    def close(self) -> None:
        self.con.close()
