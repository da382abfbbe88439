"""Load packages that can never load are quarantined, never loaded, never retried; staging is keyed by
the database's id, so databases that share a file name (and a path, on two hosts) never share packages."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import db
from storage.schema import arrow_schema
from storage.staging import BadPackage, read_manifest, stage_shard, staging_root
from heads.registry import result_tables, table

TABLES = result_tables()  # every registered head's result table

DEAD = "dead-run"


def _row(doc, label="sport", run=DEAD):
    return {"head": "topic", "doc_id": doc, "label": label, "score": 0.5, "scores": {label: 0.5}, "n_chunks": 1,
            "long_text": "chunk", "run_id": run, "model_id": "m"}


def stage(folder: Path, shard: str, docs: list[str], **manifest_changes) -> Path:
    """A valid package of head `topic`, then its manifest edited (a bad package)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(stage_shard(folder, shard, "topic", table("classifications"), "m", [_row(d) for d in docs], [],
                            [{"doc_id": d, "fingerprint": "fp" + d, "status": "done"} for d in docs], DEAD))
    if manifest_changes:
        manifest = json.loads(path.read_text())
        manifest.update(manifest_changes)
        path.write_text(json.dumps(manifest))
    return path


def fetch(database, sql, params=()):
    con = duckdb.connect(database, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("shared", [False, True], ids=["beside-database", "shared-staging"])
def test_recover_quarantines_what_cannot_load_and_never_retries_it(tmp_path, shared):
    database = str(tmp_path / "db" / "results.duckdb")
    staging = str(tmp_path / "shared") if shared else None
    db.ensure_schema(database, tables=TABLES)
    con = duckdb.connect(database)
    con.execute("CREATE TABLE x (keep INTEGER)")
    con.close()
    root = staging_root(database, staging)
    dead = root / DEAD
    stage(dead, "good", ["1", "2"])
    (dead / "badjson.json").write_text("{not json")
    stage(dead, "nopart", ["3"]).with_name("nopart.covered.parquet").unlink()
    extra = stage(dead, "extra", ["4"])  # a part with a column the table does not have
    pq.write_table(pa.table({"head": ["topic"], "doc_id": ["4"], "label": ["x"], "secret": ["y"]}),
                   extra.with_name("extra.results.parquet"))
    stage(dead, "inject", ["5"], table="runs; DROP TABLE x")
    outside = root.parent / "outside.parquet"  # a readable Parquet file outside the package folder
    pq.write_table(pa.Table.from_pylist([_row("6", "stolen")], schema=arrow_schema(table("classifications"))), outside)
    stage(dead, "escape", ["6"], results="../../outside.parquet")
    stage(dead, "absolute", ["7"], covered=str(outside))
    stage(dead, "badhead", ["8"], head="topic' OR 1=1 --")
    bad = {"badjson": "not valid JSON", "nopart": "part file missing: nopart.covered.parquet",
           "extra": "results part has columns classifications does not have: secret",
           "inject": "unknown table 'runs; DROP TABLE x'", "escape": "part 'results' is not a plain file name",
           "absolute": "part 'covered' is not a plain file name", "badhead": "invalid head name"}

    db.start_run(database, "now", None, "corpus", tables=TABLES)
    assert db.recover(database, "now", staging, tables=TABLES) == 2  # the good package's rows
    assert fetch(database, "SELECT doc_id, label FROM classifications ORDER BY doc_id") == [("1", "sport"),
                                                                                          ("2", "sport")]
    assert fetch(database, "SELECT count(*) FROM x") == [(0,)]  # not dropped
    assert fetch(database, "SELECT run_id FROM runs") == [("now",)]
    (entries,) = fetch(database, "SELECT quarantined FROM runs WHERE run_id = 'now'")[0]
    assert sorted(e.split(":")[0] for e in entries) == sorted(bad)
    for shard, reason in bad.items():
        folder = root / "quarantine" / shard
        assert reason in (folder / "reason.txt").read_text(), shard
        assert (folder / f"{shard}.json").exists()
        assert any(reason in e for e in entries if e.startswith(shard + ":")), shard
    assert (root / "quarantine" / "extra" / "extra.results.parquet").exists()  # its files go with it
    assert outside.exists() and not (root / "quarantine" / "escape" / "outside.parquet").exists()
    assert not dead.exists()  # the dead run's folder is cleared; the quarantine stays

    # later runs neither retry nor trip over the quarantined packages
    listing = sorted(p.relative_to(root) for p in (root / "quarantine").rglob("*"))
    db.start_run(database, "later", None, "corpus", tables=TABLES)
    assert db.recover(database, "later", staging, tables=TABLES) == 0
    assert sorted(p.relative_to(root) for p in (root / "quarantine").rglob("*")) == listing
    assert fetch(database, "SELECT quarantined FROM runs WHERE run_id = 'later'") == [(None,)]
    assert fetch(database, "SELECT count(*) FROM loaded_shards") == [(1,)]


@pytest.mark.parametrize("change, message", [
    ({"table": "runs; DROP TABLE x"}, "unknown table"),
    ({"table": "failed_docs"}, "unknown table"),
    ({"head": "a b"}, "invalid head name"),
    ({"results": "../../etc/passwd"}, "not a plain file name"),
    ({"failed": "/etc/passwd"}, "not a plain file name"),
    ({"covered": ".."}, "not a plain file name"),
    ({"shard_id": "../other"}, "invalid shard id"),
    ({"shard_id": "other"}, "does not match its file name"),
    ({"run_id": "a/b"}, "invalid run id"),
    ({"model_id": 3}, "model_id"),
])
def test_read_manifest_refuses_invalid_manifests(tmp_path, change, message):
    manifest = stage(tmp_path / "run", "s1", ["1"], **change)
    with pytest.raises(BadPackage, match=message):
        read_manifest(str(manifest), TABLES)


def test_read_manifest_refuses_a_part_that_links_outside(tmp_path):
    manifest = stage(tmp_path / "run", "s1", ["1"])
    target = tmp_path / "elsewhere.parquet"
    manifest.with_name("s1.results.parquet").rename(target)
    manifest.with_name("s1.results.parquet").symlink_to(target)
    with pytest.raises(BadPackage, match="outside the package folder"):
        read_manifest(str(manifest), TABLES)


def test_load_of_a_fresh_package_that_cannot_load_is_quarantined_in_the_flow(tmp_path, tiny_models,
                                                                              prefect_harness, monkeypatch, capsys):
    """The live path: a unit's package that cannot load is quarantined and reported as that unit's error;
    the other units load, and the next run redoes the unit instead of failing on it."""
    import tasks.inference
    from flows.process_corpus import process_corpus
    from taskheads.cli import main

    real_stage = tasks.inference.stage_shard

    def stage_bad_people(directory, shard_id, head, table, *args, **kwargs):
        path = real_stage(directory, shard_id, head, table, *args, **kwargs)
        if head == "people":
            manifest = json.loads(Path(path).read_text())
            Path(path).write_text(json.dumps({**manifest, "table": "runs; DROP TABLE x"}))
        return path

    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": list(range(6)), "text": [f"Ada Lovelace met Grace Hopper in Zurich {i}."
                                                             for i in range(6)]}), tmp_path / "corpus" / "a.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"""
corpus = "corpus"
database = "results.duckdb"
staging = "shared"
unit_docs = 3
[heads.topic]
task = "classification"
model = "{tiny_models['classification']}"
[heads.people]
task = "ner"
model = "{tiny_models['ner']}"
""")
    database = str(tmp_path / "results.duckdb")
    monkeypatch.setattr(tasks.inference, "stage_shard", stage_bad_people)
    first = process_corpus(config_path=str(cfg))
    assert first["status"] == "completed_with_errors"
    assert len(first["file_errors"]) == 2  # one per unit of `people`
    assert all("people failed on rows" in e and "PackageQuarantined" in e and "unknown table" in e
               for e in first["file_errors"])
    assert fetch(database, "SELECT count(*) FROM classifications") == [(6,)]
    assert fetch(database, "SELECT count(*) FROM entities") == [(0,)]
    (entries,) = fetch(database, "SELECT quarantined FROM runs WHERE run_id = ?", [first["run_id"]])[0]
    assert len(entries) == 2 and all("unknown table" in e for e in entries)
    root = staging_root(database, str(tmp_path / "shared"))
    quarantined = sorted(p.name for p in (root / "quarantine").iterdir())
    assert len(quarantined) == 2 and all("-people-" in q for q in quarantined)

    # the next run (the CLI) redoes the unit; a dead run's bad package is quarantined on the way, and said
    monkeypatch.setattr(tasks.inference, "stage_shard", real_stage)
    (root / DEAD).mkdir()
    (root / DEAD / "broken.json").write_text("{")
    assert main(["run", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "quarantined (cannot be loaded, moved to the staging folder's quarantine/): broken: manifest is not " \
           "valid JSON" in out
    assert "error:" not in out
    ((second, people),) = fetch(database, "SELECT run_id, json_extract(head_stats, '$.people.inferred')::INT FROM runs "
                                       "WHERE run_id <> ?", [first["run_id"]])
    assert people == 6 and fetch(database, "SELECT count(*) FROM entities")[0][0] > 0
    (entries,) = fetch(database, "SELECT quarantined FROM runs WHERE run_id = ?", [second])[0]
    assert entries == ["broken: manifest is not valid JSON (Expecting property name enclosed in double quotes: "
                       "line 1 column 2 (char 1))"]
    assert sorted(p.name for p in (root / "quarantine").iterdir()) == sorted(quarantined + ["broken"])


def test_shared_staging_is_keyed_by_the_database_not_its_path(tmp_path):
    shared = str(tmp_path / "shared")
    a, b = str(tmp_path / "x" / "results.duckdb"), str(tmp_path / "y" / "results.duckdb")
    db.ensure_schema(a, tables=TABLES)
    db.ensure_schema(b, tables=TABLES)
    ra, rb = staging_root(a, shared), staging_root(b, shared)
    assert ra.parent == rb.parent == tmp_path / "shared" and ra != rb
    assert ra.name == f"results.duckdb-{db.database_id(a)}"
    assert staging_root(a, shared) == ra  # stable: a rerun finds a killed run's packages
    assert staging_root(a) == tmp_path / "x" / "results.duckdb.staging"  # default: beside the database
    # two hosts with the same path: another database at the same path gets its own folder
    Path(a).unlink()
    db.ensure_schema(a, tables=TABLES)
    assert staging_root(a, shared) != ra and staging_root(a, shared).parent == ra.parent
