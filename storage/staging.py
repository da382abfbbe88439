"""Load packages: each (unit, head) result is staged as Parquet files plus a manifest.

Files are written under a temporary name and renamed into place (atomic on one filesystem); the
manifest is written last, so a manifest on disk always names complete files. The loader only
ever reads manifests, which makes staging safe to interrupt at any point.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import COVERED_SCHEMA, arrow_schema


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def staging_root(database: str, staging: str | None = None) -> Path:
    """Where a database's load packages are staged: beside it (`<database>.staging/`), or under a
    configured folder that every worker can reach (a shared filesystem when workers are machines),
    in a subfolder of its own per database so that recovery never loads another database's packages."""
    if not staging:
        return Path(database).with_name(Path(database).name + ".staging")
    key = hashlib.sha1(str(Path(database).resolve()).encode()).hexdigest()[:10]
    return Path(staging) / f"{Path(database).name}-{key}"


def staging_dir(database: str, run_id: str, staging: str | None = None) -> Path:
    d = staging_root(database, staging) / run_id
    d.mkdir(parents=True, exist_ok=True)
    return d


PARTS = ("results", "failed", "covered")


def stage_shard(directory: Path, shard_id: str, head: str, table: str, model_id: str, rows: Sequence[dict],
                failed: Sequence[dict], covered: Sequence[dict], run_id: str) -> str:
    """Write one load package; returns the manifest path.

    `covered` lists the documents whose rows this package replaces: {doc_id, fingerprint, status}.
    """
    directory = Path(directory)
    tables = {"results": pa.Table.from_pylist(list(rows), schema=arrow_schema(table)),
              "failed": pa.Table.from_pylist(list(failed), schema=arrow_schema("failed_docs")),
              "covered": pa.Table.from_pylist(list(covered), schema=COVERED_SCHEMA)}
    manifest = {"shard_id": shard_id, "run_id": run_id, "head": head, "table": table, "model_id": model_id,
                "result_rows": len(rows), "failed_rows": len(failed)}
    for part, data in tables.items():
        path = directory / f"{shard_id}.{part}.parquet"
        _atomic_write_parquet(data, path)
        manifest[part] = path.name
    path = directory / f"{shard_id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def read_manifest(path: str) -> tuple[dict, dict[str, pa.Table]]:
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    base = Path(path).parent
    return manifest, {part: pq.read_table(base / manifest[part]) for part in PARTS}


def remove_shard(path: str) -> None:
    """Delete a loaded package: the manifest first, so a crash never leaves a manifest without files."""
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    base = Path(path).parent
    Path(path).unlink(missing_ok=True)
    for part in PARTS:
        (base / manifest[part]).unlink(missing_ok=True)


def staged_manifests(database: str, staging: str | None = None) -> list[str]:
    """Complete load packages left by earlier runs (a crash between staging and loading)."""
    root = staging_root(database, staging)
    return sorted(str(p) for p in root.glob("*/*.json")) if root.is_dir() else []


def clear_staging(database: str, keep_run: str | None = None, staging: str | None = None) -> None:
    """Remove staging folders (partial files of dead runs) except the current run's."""
    import shutil

    root = staging_root(database, staging)
    if root.is_dir():
        for d in root.iterdir():
            if d.name != keep_run:
                shutil.rmtree(d, ignore_errors=True)
