"""A corpus may be a saved Hugging Face dataset folder (Dataset or DatasetDict `save_to_disk`):
it gives the same results as the same rows in Parquet, reruns infer nothing, edits re-infer only
the changed rows, and a broken dataset folder is one error line naming it while the rest runs."""
from __future__ import annotations

import os
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROWS = [{"id": f"d{k}", "text": t} for k, t in enumerate([
    "Grace Hopper founded Initech in Lagos .",
    "Shares fell sharply after the quarterly earnings report .",
    "The striker scored twice in the final minutes .",
    "Ada Lovelace wrote the first program .",
    "Rain is expected across the north tomorrow .",
    "",  # a row that cannot be a document: reported with the dataset folder and row
])]


def _run(root, corpus, db):
    from flows.process_corpus import process_corpus

    return process_corpus(config_path=str(root / "p.toml"), corpus=str(corpus), database=str(root / db))


def _results(root, db):
    con = duckdb.connect(str(root / db), read_only=True)
    try:  # scores rounded: batches differ between runs and float sums with them, in the last digits
        done = con.execute("SELECT doc_id, label, round(score, 5) FROM classifications ORDER BY doc_id").fetchall()
        failed = con.execute("SELECT doc_id, error, source_file, source_row FROM failed_docs "
                             "ORDER BY doc_id").fetchall()
        return done, failed
    finally:
        con.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_models, prefect_harness):
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("hfds")
    old = os.environ.get("TASKHEADS_CACHE")
    os.environ["TASKHEADS_CACHE"] = str(root / "cache")
    (root / "p.toml").write_text(f"""
corpus = "unused"
database = "unused.duckdb"
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
""")
    (root / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), root / "pq" / "a.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(root / "ds"))
    DatasetDict({"train": Dataset.from_list(ROWS[:3]),
                 "test": Dataset.from_list(ROWS[3:])}).save_to_disk(str(root / "dd"))
    yield root
    if old is None:
        os.environ.pop("TASKHEADS_CACHE", None)
    else:
        os.environ["TASKHEADS_CACHE"] = old


@pytest.fixture(scope="module")
def reference(root):
    summary = _run(root, root / "pq", "pq.duckdb")
    assert summary["heads"]["topic"]["done"] == 5
    return (*_results(root, "pq.duckdb"), summary["heads"]["topic"])


def _counts(head):
    return {k: head[k] for k in ("routed", "inferred", "done", "failed", "unchanged")}


def test_saved_dataset_equals_parquet(root, reference):
    before = sorted(os.listdir(root / "ds"))
    summary = _run(root, root / "ds", "ds.duckdb")
    assert _counts(summary["heads"]["topic"]) == _counts(reference[2]) and summary["file_errors"] == []
    done, failed = _results(root, "ds.duckdb")
    assert done == reference[0] and len(done) == 5
    # the failure names the dataset folder the user saved (not the cache file) and its row
    assert failed == [("d5", "empty text", str(root / "ds"), 5)]
    assert sorted(os.listdir(root / "ds")) == before  # nothing written into the user's dataset folder
    assert list((root / "cache").rglob("*.parquet"))  # the export went to the cache


def test_dataset_dict_reads_every_split(root, reference):
    summary = _run(root, root / "dd", "dd.duckdb")
    assert _counts(summary["heads"]["topic"]) == _counts(reference[2]) and summary["files"] == 2
    done, failed = _results(root, "dd.duckdb")
    assert done == reference[0]
    # the split is named by its folder in source_file; the row is the row within the split
    assert failed == [("d5", "empty text", str(root / "dd" / "test"), 2)]


def test_rerun_infers_nothing_and_edits_reinfer_only_changed_rows(root, reference):
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(root / "ds2"))
    first = _run(root, root / "ds2", "edit.duckdb")["heads"]["topic"]
    assert first["inferred"] == 5 and first["failed"] == 1
    again = _run(root, root / "ds2", "edit.duckdb")["heads"]["topic"]
    assert again["inferred"] == 0 and again["unchanged"] == 5 and again["skipped_failed"] == 1
    edited = [dict(r) for r in ROWS]
    edited[1]["text"] = "Shares rose sharply after the quarterly earnings report ."
    edited.append({"id": "d6", "text": "A new document added to the dataset ."})
    shutil.rmtree(root / "ds2")
    Dataset.from_list(edited).save_to_disk(str(root / "ds2"))  # re-saved with edits, same folder
    third = _run(root, root / "ds2", "edit.duckdb")["heads"]["topic"]
    assert third["inferred"] == 2 and third["unchanged"] == 4
    done, _ = _results(root, "edit.duckdb")
    assert {d for d, _, _ in done} == {f"d{k}" for k in (0, 1, 2, 3, 4, 6)}


def test_broken_dataset_folder_is_named_and_the_rest_runs(root, reference):
    from datasets import Dataset

    mixed = root / "mixed"
    mixed.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), mixed / "a.parquet")
    Dataset.from_list(ROWS[3:5]).save_to_disk(str(mixed / "good"))
    Dataset.from_list(ROWS[:2]).save_to_disk(str(mixed / "broken"))
    (arrow,) = (mixed / "broken").glob("data-*.arrow")
    arrow.write_bytes(b"this is not an Arrow file")
    summary = _run(root, mixed, "mixed.duckdb")
    assert summary["status"] == "completed_with_errors"
    (error,) = summary["file_errors"]
    assert error.startswith(f"{mixed / 'broken'}: not a loadable saved Hugging Face dataset (")
    assert "\n" not in error
    assert summary["heads"]["topic"]["done"] == 5 and summary["files"] == 3
    done, _ = _results(root, "mixed.duckdb")
    assert done == [r for r in reference[0] if r[0] in {"d0", "d1", "d2", "d3", "d4"}]


def test_export_is_cached_by_saved_state_and_broken_folders_are_named(tmp_path, monkeypatch):
    """No flow: the export is made once per saved state, replaced when re-saved; every kind of broken
    dataset folder is one line naming it."""
    from datasets import Dataset, DatasetDict

    from storage.corpus import check_files, corpus_files

    monkeypatch.setenv("TASKHEADS_CACHE", str(tmp_path / "cache"))
    Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "c" / "ok"))
    (first,) = corpus_files(str(tmp_path / "c"))
    stamp = os.stat(first).st_mtime_ns
    assert corpus_files(str(tmp_path / "c")) == [first] and os.stat(first).st_mtime_ns == stamp  # reused
    assert pq.read_table(first).to_pylist() == ROWS[:2]
    shutil.rmtree(tmp_path / "c" / "ok")
    Dataset.from_list(ROWS[2:4]).save_to_disk(str(tmp_path / "c" / "ok"))
    (second,) = corpus_files(str(tmp_path / "c"))
    assert second != first and not os.path.exists(first)  # the older export of this folder is gone
    assert pq.read_table(second).to_pylist() == ROWS[2:4]

    bad = tmp_path / "bad"
    Dataset.from_list(ROWS[:2]).save_to_disk(str(bad / "state"))
    (bad / "state" / "state.json").write_text("{not json")
    DatasetDict({"train": Dataset.from_list(ROWS[:2])}).save_to_disk(str(bad / "dict"))
    (bad / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')  # test is missing
    files = corpus_files(str(bad))
    good, errors = check_files(files, ["id", "text"])
    assert [pq.read_table(f).to_pylist() for f in good] == [ROWS[:2]]
    assert [e.split(": not a loadable saved Hugging Face dataset (")[0] for e in errors] == [
        str(bad / "dict" / "test"), str(bad / "state")]
    assert all("\n" not in e and e.endswith(")") for e in errors)
