"""A head's model identity from its files, without loading the model.

The model id says what exactly produced a row: the head's task and params (class defaults, the
config's values, and what a head derives from its model folder, such as the embedding head's
pooling), the source and revision, and the sha256 of every file that changes outputs: the weights
(*.safetensors), config.json, generation_config.json, the tokenizer files and the
sentence-transformers module files. Nothing is instantiated, so a rerun with nothing to do costs no
model load; file hashes are cached by path, size, mtime, ctime and inode (`hash_cache_dir`), so an
unchanged 90 MB model is not read again either.

Identity version 2 (this module) hashes more files than version 1 did (weights and config.json
only, computed from a loaded head), so the same model has a new id. `legacy_model_id` is its
version-1 id, computed from the same files: a database holding rows under it is mapped to the new
id (storage.db.register_model), not re-inferred.

Hub ids (not local folders) are read from the Hugging Face cache (`snapshot_download(...,
local_files_only=True)`): offline works when the model is cached; the snapshot's commit is the
resolved revision.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from core.errors import ModelLoadError

from .backends import resolve_backend, tagged_dtype

IDENTITY_VERSION = 2

# besides *.safetensors: the files whose content changes what a head outputs
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "source.spm", "target.spm", "tokenizer.model", "chat_template.jinja", "chat_template.json")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class IdentityError(ModelLoadError):
    """The model's files cannot be found or read; the message names the head's key (a model that
    cannot be identified cannot run: the CLI refuses it like one that cannot load)."""


# --- file hashes, cached by path and stat ---------------------------------------------------------

def hash_cache_dir() -> Path:
    """Where file hashes are cached: TASKHEADS_CACHE_DIR, else $XDG_CACHE_HOME/taskheads, else ~/.cache/taskheads."""
    if os.environ.get("TASKHEADS_CACHE_DIR"):
        return Path(os.environ["TASKHEADS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskheads"


class _HashCache:
    """sha256 of files keyed by (absolute path, size, mtime_ns, ctime_ns, inode): a rewritten or
    replaced file has another key. Kept in one JSON file; unreadable or unwritable cache = no cache."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[str, str] | None = None
        self.path: Path | None = None
        self.dirty = False

    def _load(self) -> dict[str, str]:
        path = hash_cache_dir() / "file-hashes.json"
        if self.entries is None or path != self.path:
            self.path, self.entries = path, {}
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self.entries = {k: v for k, v in data.items() if isinstance(v, str)}
            except (OSError, ValueError):
                pass
        return self.entries

    def get(self, key: str) -> str | None:
        with self.lock:
            return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        with self.lock:
            self._load()[key] = value
            self.dirty = True

    def save(self) -> None:
        """Write the cache (merged with what another process wrote meanwhile); never raises."""
        with self.lock:
            if not self.dirty or self.path is None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    on_disk = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    on_disk = {}
                merged = {**(on_disk if isinstance(on_disk, dict) else {}), **self.entries}
                if len(merged) > 20000:  # stale entries of deleted files: keep the newest ones
                    merged = dict(list(merged.items())[-10000:])
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".file-hashes-")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(merged, f)
                os.replace(tmp, self.path)
                self.dirty = False
            except OSError:
                pass


_CACHE = _HashCache()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])


def file_hashes(paths: Iterable[Path], legacy: Iterable[Path] = ()) -> tuple[dict[Path, str], str | None]:
    """sha256 of each file, and the version-1 weights hash of `legacy` (sha256 over name + content of
    each file, sorted by path), reading each file at most once and only when not cached."""
    paths = list(dict.fromkeys(list(paths) + list(legacy)))
    legacy = sorted(legacy)
    keys = {p: _stat_key(p) for p in paths}
    legacy_key = "v1:" + hashlib.sha256(json.dumps([keys[p] for p in legacy]).encode()).hexdigest() if legacy else None
    out = {p: _CACHE.get(keys[p]) for p in paths}
    legacy_hash = _CACHE.get(legacy_key) if legacy_key else None
    if any(v is None for v in out.values()) or (legacy_key and legacy_hash is None):
        combined = hashlib.sha256()
        in_legacy = set(legacy)
        for p in (legacy + [q for q in paths if q not in in_legacy]):
            h = hashlib.sha256()
            if p in in_legacy:
                combined.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    if p in in_legacy:
                        combined.update(block)
            out[p] = h.hexdigest()
            _CACHE.put(keys[p], out[p])
        if legacy_key:
            legacy_hash = combined.hexdigest()
            _CACHE.put(legacy_key, legacy_hash)
        _CACHE.save()
    return out, legacy_hash


# --- where the files are ----------------------------------------------------------------------------

def model_folder(cfg) -> tuple[Path | None, str | None]:
    """(folder holding the model's files, resolved hub commit) for a head config; (None, None) for a
    model-free head. A hub id is looked up in the local Hugging Face cache (downloaded there first
    when the hub is reachable and it is not cached yet)."""
    from .registry import head_class

    if head_class(cfg.task).model_class is None:
        return None, None
    local = Path(cfg.model)
    if local.is_dir():
        return local, _commit_in_path(local)
    try:
        folder = _hub_snapshot(cfg.model, cfg.revision)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IdentityError(f"heads.{cfg.name}.model: cannot load {cfg.model!r}: not a folder and not in the "
                            f"local Hugging Face cache ({reason})") from exc
    return folder, folder.name if _COMMIT.match(folder.name) else None


# the files from_pretrained reads (weights as safetensors only), fetched on a hub model's first use
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*"]


def _hub_snapshot(model: str, revision: str | None) -> Path:
    """The hub model's folder in the local Hugging Face cache; with network access (HF_HUB_OFFLINE
    unset) a model not cached yet is downloaded first, as from_pretrained would."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:
        if constants.HF_HUB_OFFLINE:
            raise
    return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))


def _commit_in_path(folder: Path) -> str | None:
    """The commit of a folder inside a Hugging Face cache (`.../snapshots/<commit>/`), else None."""
    found = re.search(r"snapshots/([^/]+)/", folder.as_posix() + "/")
    return found.group(1) if found and _COMMIT.match(found.group(1)) else None


def identity_files(folder: Path) -> list[Path]:
    """The files of a model folder that change outputs (see the module docstring)."""
    names = set(CONFIG_FILES) | set(TOKENIZER_FILES) | set(SENTENCE_TRANSFORMERS_FILES)
    files = [p for p in folder.iterdir() if p.is_file() and (p.name in names or p.suffix == ".safetensors")]
    modules = folder / "modules.json"
    if modules.is_file():  # sentence-transformers module folders (1_Pooling/config.json, ...)
        try:
            for m in json.loads(modules.read_text(encoding="utf-8")) or []:
                sub = str(m.get("path") or "")
                if sub and (folder / sub / "config.json").is_file() and ".." not in Path(sub).parts:
                    files.append(folder / sub / "config.json")
        except (OSError, ValueError, AttributeError):
            pass  # the embedding head refuses an unreadable modules.json itself, naming the head
    return sorted(set(files))


# --- params ---------------------------------------------------------------------------------------

def head_params(cfg, folder: Path | None) -> dict[str, Any]:
    """What `Head.p` is once the head is loaded (class defaults, the config's params, values the head
    derives from its folder), computed from the files: sorted by key."""
    from .registry import head_class

    cls = head_class(cfg.task)
    p = {**cls.params, **dict(cfg.params)}
    cls.validate_params(p)
    try:
        p = cls.params_from_files(cfg.name, p, folder)
    except ValueError as exc:
        raise IdentityError(str(exc)) from None
    return {k: p[k] for k in sorted(p)}


def id_params(task: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The params hashed into the model id: all of them, less the keys the head added later
    (`HeadParams.added_later`) while they hold their default, which reproduces the old output."""
    from .registry import head_class

    cls = head_class(task)
    later = cls.Params.added_later
    return {k: v for k, v in params.items() if not (k in later and v == cls.params.get(k))}


# --- the identity ---------------------------------------------------------------------------------

def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(cfg, params: Mapping[str, Any] | None = None) -> dict:
    """The head's model identity (a `models` row) from its files; `params` overrides the
    params derived from the config (a loaded head's `p`). Keys: model_id, legacy_model_id, head,
    task, source, revision, resolved_revision, weights_sha256, params, dtype (`int8@onnxruntime` when not
    torch), backend, files."""
    folder, resolved = model_folder(cfg)
    params = head_params(cfg, folder) if params is None else {k: params[k] for k in sorted(params)}
    files: dict[str, str] = {}
    weights = None
    if folder is not None:
        paths = identity_files(folder)
        legacy = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
        try:
            hashes, weights = file_hashes(paths, legacy if Path(cfg.model).is_dir() else ())
        except OSError as exc:
            raise IdentityError(f"heads.{cfg.name}.model: cannot read {exc.filename or folder}: "
                                f"{exc.strerror or exc}") from None
        files = {p.relative_to(folder).as_posix(): h for p, h in hashes.items()}
    # the backend that will run (`auto` resolved from the config and the installed packages, as the
    # load resolves it): part of the id when not torch, since its results differ; torch ids never change
    hashed = id_params(cfg.task, params)
    backend = resolve_backend(cfg.task, getattr(cfg, "backend", "torch"), cfg.dtype)
    on_backend = [] if backend == "torch" else [backend]
    model_id = _digest([f"taskheads-model/{IDENTITY_VERSION}", cfg.task, cfg.model, cfg.revision, resolved, files,
                        hashed, cfg.dtype] + on_backend)
    # version 1 (before this module): weights only for local folders, from a loaded head; its resolved
    # revision was the config's `_commit_hash`, which transformers 5 (pinned) no longer sets: None
    legacy_id = _digest([cfg.task, cfg.model, cfg.revision, None, weights, hashed, cfg.dtype] + on_backend)
    if weights is None and files:  # a hub model: record a weights hash all the same (lineage)
        weights = hashlib.sha256(json.dumps({k: v for k, v in files.items() if k.endswith(".safetensors")},
                                            sort_keys=True).encode()).hexdigest()
    return {"model_id": model_id, "legacy_model_id": legacy_id, "head": cfg.name, "task": cfg.task,
            "source": cfg.model, "revision": cfg.revision, "resolved_revision": resolved,
            "weights_sha256": weights, "params": params, "dtype": tagged_dtype(cfg.dtype, backend),
            "backend": backend, "files": files}
