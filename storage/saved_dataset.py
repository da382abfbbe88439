"""Saved Hugging Face datasets as corpus sources: export once to a cached Parquet file.

A folder written by `Dataset.save_to_disk` (state.json, dataset_info.json, data-*.arrow) is loaded
with `datasets.load_from_disk` and exported, row order kept, to one Parquet file in the user cache
(`$TASKHEADS_CACHE`, else `$XDG_CACHE_HOME/taskheads`, else `~/.cache/taskheads`; folder
`datasets/`), never inside the user's dataset folder. A `DatasetDict` folder (dataset_dict.json)
is one saved Dataset per split, in its subfolder: every split is its own source.

The rest of the pipeline then reads Parquet as usual (planning, fingerprints, incremental reruns).
The cache key is the dataset's state.json (holding its `_fingerprint`) plus the name, size and
mtime of each data file, and the folder's absolute path: a re-saved dataset gets a new export, an
untouched one reuses it (a stale export of a changed folder is never used; an extra export costs
time only, since documents are fingerprinted by content). The export's Parquet metadata names the
dataset folder, so failures report the folder the user saved (`source_name`), not the cache file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

SOURCE_KEY = b"taskheads.source"


class DatasetLoadError(Exception):
    """A saved dataset folder that cannot be loaded or exported."""


def cache_root() -> Path:
    env = os.environ.get("TASKHEADS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskheads"


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def dataset_sources(folder: Path) -> list[Path]:
    """The saved Dataset folders under `folder` (itself included): a DatasetDict gives one per split,
    in the order its dataset_dict.json lists them. A split it lists but does not hold is still
    returned, so loading it reports the problem with the folder's name."""
    found: list[Path] = []
    for marker in sorted([*folder.rglob("dataset_dict.json"), *folder.rglob("state.json")]):
        d = marker.parent
        if marker.name == "dataset_dict.json":
            try:
                splits = json.loads(marker.read_text())["splits"]
            except Exception:
                splits = []
            found += [d / s for s in splits] or [d]  # unreadable dict: the folder itself, reported on export
        else:
            found.append(d)
    out: list[Path] = []
    for d in found:
        if d not in out:
            out.append(d)
    return out


def _key(folder: Path) -> tuple[str, str]:
    """(folder key, content key): what names the export of this folder and this saved state."""
    folder_key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    h.update((folder / "state.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix == ".arrow":
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return folder_key, h.hexdigest()[:16]


def export(folder: str | Path) -> str:
    """The Parquet export of one saved Dataset folder (made on first use); DatasetLoadError otherwise."""
    folder = Path(folder)
    try:
        folder_key, content_key = _key(folder)
    except OSError as exc:
        raise DatasetLoadError(_describe(exc)) from None
    out_dir = cache_root() / "datasets"
    out = out_dir / f"{folder_key}-{content_key}.parquet"
    if out.is_file():
        return str(out)
    try:
        from datasets import Dataset, load_from_disk

        ds = load_from_disk(str(folder))
        if not isinstance(ds, Dataset):
            raise DatasetLoadError(f"a {type(ds).__name__}, not one split")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        schema = ds.data.schema
        writer = None
        try:
            for batch in ds.with_format("arrow").iter(batch_size=10_000):
                if writer is None:
                    schema = batch.schema
                    writer = pq.ParquetWriter(tmp, schema.with_metadata({SOURCE_KEY: os.path.abspath(folder).encode()}))
                writer.write_table(batch.replace_schema_metadata(None).cast(schema.remove_metadata()))
            if writer is None:  # empty dataset: an empty file with its columns
                writer = pq.ParquetWriter(tmp, schema.with_metadata({SOURCE_KEY: os.path.abspath(folder).encode()}))
        finally:
            if writer is not None:
                writer.close()
        os.replace(tmp, out)
    except Exception as exc:
        Path(out.with_name(f".{out.name}.{os.getpid()}.tmp")).unlink(missing_ok=True)
        raise DatasetLoadError(str(exc) if isinstance(exc, DatasetLoadError) else _describe(exc)) from None
    for old in out_dir.glob(f"{folder_key}-*.parquet"):  # earlier exports of this folder
        if old != out:
            old.unlink(missing_ok=True)
    return str(out)


def source_name(path: str) -> str:
    """The dataset folder a cached export was made from; any other file: its own path."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return path
    source = meta.get(SOURCE_KEY)
    return source.decode() if source else path


def short_name(path: str) -> str:
    """How messages name a source briefly: a file's name; a DatasetDict split as `<dict folder>/<split>`."""
    source = Path(source_name(path))
    if (source.parent / "dataset_dict.json").is_file():
        return f"{source.parent.name}/{source.name}"
    return source.name


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


