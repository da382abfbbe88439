"""Load packages: each (unit, head) result is staged as Parquet files plus a manifest.

Files are written under a temporary name and renamed into place (atomic on one filesystem); the
manifest is written last, so a manifest on disk always names complete files. The loader only
ever reads manifests, which makes staging safe to interrupt at any point.

A manifest is input like any other (a shared folder, a package from another release): it is
validated before anything is loaded, and a package that can never load is moved to
`<staging root>/quarantine/<shard>/` with its reason, where no run looks again.
"""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from core.names import HEAD_NAME
from core.tables import ResultTable

from .schema import COVERED_SCHEMA, FAILED_SCHEMA, arrow_schema

QUARANTINE = "quarantine"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # shard and run ids: one path component


class BadPackage(ValueError):
    """A load package that can never load (bad manifest, missing or foreign part): quarantine it."""


class PackageQuarantined(Exception):
    """Raised by the loader after moving a package to quarantine; the message says why."""


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def staging_root(database: str, staging: str | None = None) -> Path:
    """Where a database's load packages are staged: beside it (`<database>.staging/`), or under a
    configured folder that every worker can reach (a shared filesystem when workers are machines),
    in a subfolder of its own per database: `<name>-<database id>`. The id (a UUID the database got
    when created) and not its path, because two hosts may have a database at the same path."""
    from . import lake

    if lake.is_lake(database):  # beside a SQLite catalog; a PostgreSQL catalog has no "beside"
        file = lake.catalog_file(database)
        if not staging and file is None:
            raise lake.LakeError(f"{database}: a lake with a PostgreSQL catalog needs `staging` (a folder for "
                                 "load packages, shared by every machine that runs units)")
        if not staging:
            return file.with_name(file.name + ".staging")
    if not staging:
        return Path(database).with_name(Path(database).name + ".staging")
    from .db import database_id  # db imports this module

    if lake.is_lake(database):  # (a lake's id never changes: looked up once per process, not per package)
        if database not in _LAKE_IDS:
            _LAKE_IDS[database] = database_id(database)
        return Path(staging) / f"{lake.local_name(database)}-{_LAKE_IDS[database]}"
    return Path(staging) / f"{Path(database).name}-{database_id(database)}"


_LAKE_IDS: dict[str, str] = {}


def staging_dir(database: str, run_id: str, staging: str | None = None) -> Path:
    d = staging_root(database, staging) / run_id
    d.mkdir(parents=True, exist_ok=True)
    return d


PARTS = ("results", "failed", "covered")


def stage_shard(directory: Path, shard_id: str, head: str, table: ResultTable, model_id: str, rows: Sequence[dict],
                failed: Sequence[dict], covered: Sequence[dict], run_id: str,
                replaces: Sequence[int | None] | None = None, planned_after: int = 0,
                plan_id: str | None = None, planned_snapshot: int | None = None) -> str:
    """Write one load package of rows for `table` (the head's declaration); returns the manifest path.

    `covered` lists the documents whose rows this package replaces: {doc_id, fingerprint, status}.
    `replaces`, `planned_after`, `plan_id`, `planned_snapshot`: where those rows are, as the plan saw it
    (`WorkUnit`); without `replaces` or `plan_id` (or, into a lake, `planned_snapshot`) the load searches
    all of the head's rows.
    """
    directory = Path(directory)
    tables = {"results": pa.Table.from_pylist(list(rows), schema=arrow_schema(table)),
              "failed": pa.Table.from_pylist(list(failed), schema=FAILED_SCHEMA),
              "covered": pa.Table.from_pylist(list(covered), schema=COVERED_SCHEMA)}
    manifest = {"shard_id": shard_id, "run_id": run_id, "head": head, "table": table.name, "model_id": model_id,
                "result_rows": len(rows), "failed_rows": len(failed)}
    if replaces is not None and plan_id is not None:  # both, or the package would not load (read_manifest)
        manifest |= {"replaces": list(replaces), "planned_after": int(planned_after), "plan_id": plan_id}
        if planned_snapshot is not None:
            manifest["planned_snapshot"] = int(planned_snapshot)
    for part, data in tables.items():
        path = directory / f"{shard_id}.{part}.parquet"
        _atomic_write_parquet(data, path)
        manifest[part] = path.name
    path = directory / f"{shard_id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


_MANIFEST_KEYS = ("shard_id", "run_id", "head", "table", "model_id", *PARTS)


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _part_path(base: Path, part: str, name: str) -> Path:
    """A part is a plain file name inside the package folder: never a path, never a link out of it."""
    if not _plain(name):
        raise BadPackage(f"part {part!r} is not a plain file name: {name!r}")
    path = base / name
    if not path.exists() and not path.is_symlink():
        raise BadPackage(f"part file missing: {name}")
    if path.resolve().parent != base.resolve():
        raise BadPackage(f"part {part!r} ({name}) links outside the package folder")
    return path


def _conform(data: pa.Table, schema: pa.Schema, part: str, target: str, required: Sequence[str]) -> pa.Table:
    """The part as the loader expects it: its columns must exist in `target`; columns it lacks (a package
    staged by an older release) are NULL, unless the loader cannot do without them."""
    extra = [c for c in data.column_names if c not in schema.names]
    if extra:
        raise BadPackage(f"{part} part has columns {target} does not have: {', '.join(extra)}")
    missing = [c for c in required if c not in data.column_names]
    if missing:
        raise BadPackage(f"{part} part lacks columns: {', '.join(missing)}")
    columns = []
    for f in schema:
        if f.name not in data.column_names:
            columns.append(pa.nulls(data.num_rows, f.type))
            continue
        try:
            columns.append(data.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise BadPackage(f"{part} part column {f.name} is not {f.type}: {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)


def read_manifest(path: str, tables: Sequence[ResultTable]) -> tuple[dict, dict[str, pa.Table]]:
    """The manifest and its parts, validated: a known result table (one of `tables`), a valid head name, ids that are one
    path component, parts that are plain files inside the manifest's folder with known columns.
    Raises BadPackage for a package that can never load; OSError (worth retrying) when unreadable."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as exc:
        raise BadPackage(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BadPackage("manifest is not a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise BadPackage(f"manifest lacks {', '.join(missing)}")
    for key in _MANIFEST_KEYS:
        if not isinstance(manifest[key], str):
            raise BadPackage(f"manifest {key} is not a string: {manifest[key]!r}")
    known = {t.name: t for t in tables}
    table = manifest["table"]
    if table not in known:
        raise BadPackage(f"unknown table {table!r} (result tables: {', '.join(known)})")
    if not HEAD_NAME.match(manifest["head"]):
        raise BadPackage(f"invalid head name {manifest['head']!r}")
    for key, what in (("shard_id", "shard id"), ("run_id", "run id")):
        if not _ID.match(manifest[key]):
            raise BadPackage(f"invalid {what} {manifest[key]!r}")
    if path.name != f"{manifest['shard_id']}.json":
        raise BadPackage(f"shard id {manifest['shard_id']!r} does not match its file name {path.name}")
    if "replaces" in manifest:  # where the documents' earlier rows are (storage.schema, load_id)
        replaces, after, plan = manifest["replaces"], manifest.get("planned_after"), manifest.get("plan_id")
        if not (isinstance(replaces, list) and all(x is None or (type(x) is int and x >= 0) for x in replaces)):
            raise BadPackage(f"manifest replaces is not a list of load ids: {replaces!r}")
        if type(after) is not int or after < 0 or not isinstance(plan, str):
            raise BadPackage(f"manifest planned_after / plan_id invalid: {after!r} / {plan!r}")
        snapshot = manifest.get("planned_snapshot", 0)
        if type(snapshot) is not int or snapshot < 0:
            raise BadPackage(f"manifest planned_snapshot is not a lake snapshot id: {snapshot!r}")
    expected = {"results": (arrow_schema(known[table]), table, ["head", "doc_id"]),
                "failed": (FAILED_SCHEMA, "failed_docs", ["head", "doc_id"]),
                "covered": (COVERED_SCHEMA, "the covered list", COVERED_SCHEMA.names)}
    parts = {}
    for part in PARTS:
        file = _part_path(path.parent, part, manifest[part])
        try:
            data = pq.read_table(file)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise BadPackage(f"part {manifest[part]} is not readable Parquet ({exc})") from None
        schema, target, required = expected[part]
        parts[part] = _conform(data, schema, part, target, required)
    return manifest, parts


def _package_files(path: Path) -> list[str]:
    """The names of a package's files in its folder: the manifest, the parts it names (plain names only,
    as its contents are not trusted) and the names staging gives parts."""
    stem = path.name.removesuffix(".json")
    names = [path.name] + [f"{stem}.{part}.parquet" for part in PARTS]
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        names += [manifest[p] for p in PARTS if isinstance(manifest.get(p), str) and _plain(manifest[p])]
    except (OSError, ValueError, AttributeError):
        pass
    return list(dict.fromkeys(names))


def remove_shard(path: str) -> None:
    """Delete a loaded package: the manifest first, so a crash never leaves a manifest without files."""
    base = Path(path).parent
    for name in _package_files(Path(path)):  # the manifest comes first
        (base / name).unlink(missing_ok=True)


def quarantine(manifest_path: str, reason: str) -> Path:
    """Move a package that cannot be loaded to `<staging root>/quarantine/<shard>/`, with `reason.txt`,
    out of every run's way; returns that folder. Only the package's own files move."""
    manifest = Path(manifest_path)
    folder = manifest.parent
    stem = manifest.name.removesuffix(".json")
    dest, n = folder.parent / QUARANTINE / stem, 1
    while dest.exists():  # quarantined before (a crash mid-move): keep both
        n += 1
        dest = folder.parent / QUARANTINE / f"{stem}-{n}"
    dest.mkdir(parents=True)
    (dest / "reason.txt").write_text(f"{reason}\nfrom: {manifest}\nat: {datetime.now(timezone.utc).isoformat()}\n",
                                     encoding="utf-8")
    for name in _package_files(manifest):  # the manifest first: what is left is never loaded
        if (folder / name).exists() or (folder / name).is_symlink():
            os.replace(folder / name, dest / name)
    return dest


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def staged_manifests(database: str, staging: str | None = None) -> list[str]:
    """Complete load packages waiting to load (this run's, a run's that ended while the file was held, or a
    crash's between staging and loading), oldest first: a document staged twice ends with its latest rows."""
    root = staging_root(database, staging)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("*/*.json") if p.parent.name != QUARANTINE]
    return [str(p) for p in sorted(found, key=lambda p: (_mtime(p), str(p)))]


# --- a run's other writes (its `runs` row, models, recovery, evaluations, the finish), staged too ---------
OP_SUFFIX = ".op"


def stage_op(directory: Path, kind: str, payload: dict) -> str:
    """Write one of a run's database writes as `<time ns>.<kind>.op` (JSON) into its staging folder, atomically;
    the loader applies ops in the order they were staged, in the first transaction that gets the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.time_ns():020d}.{kind}{OP_SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, **payload}, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def staged_ops(database: str, staging: str | None = None) -> list[str]:
    """Ops waiting for the database, in the order they were staged (across runs)."""
    root = staging_root(database, staging)
    if not root.is_dir():
        return []
    return sorted((str(p) for p in root.glob(f"*/*{OP_SUFFIX}") if p.parent.name != QUARANTINE),
                  key=lambda p: Path(p).name)


def read_op(path: str) -> dict | None:
    """An op as staged, or None for one that is not readable JSON (written by nothing that finished)."""
    try:
        op = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return op if isinstance(op, dict) and isinstance(op.get("kind"), str) else None


def _pending(folder: Path) -> bool:
    return any(folder.glob("*.json")) or any(folder.glob(f"*{OP_SUFFIX}"))


def held(path: Path) -> bool:
    """Whether another open file holds an flock on `path` (a live run's `.alive` file on a lake)."""
    import fcntl

    try:
        handle = open(path, "r")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def clear_staging(database: str, keep_run: str | None = None, staging: str | None = None,
                  keep: set[str] | frozenset = frozenset()) -> None:
    """Remove staging folders of ended runs (their partial files) except the current run's, the quarantine,
    the folders of `keep` and of runs alive right now (a lake: `<run>.alive` locked, checked per folder just
    before removing it, as a run takes that lock before it makes its folder) and any folder still holding
    packages or ops that wait."""
    import shutil

    root = staging_root(database, staging)
    if root.is_dir():
        for d in root.iterdir():
            if d.name not in (keep_run, QUARANTINE) and d.name not in keep and d.is_dir() and not _pending(d) \
                    and not held(root / f"{d.name}.alive"):
                shutil.rmtree(d, ignore_errors=True)
