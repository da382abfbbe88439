"""Exceptions that cross layers: raised below, handled above (the CLI turns them into one line)."""
from __future__ import annotations


class ConfigError(ValueError):
    """The configuration cannot run; the message names the offending key."""


class DocumentError(Exception):
    """A terminal problem with one document (a prompt longer than the model window, text the tokenizer
    rejects): it goes to `failed_docs` with this reason (kind `terminal`) and is not retried until the
    text, the model or the head's params change, or `taskheads run --retry-failed`.

    Any exception that is neither this nor `TransientDocumentError` (nor out of memory on one
    feature) is not the document's fault: it fails the whole unit, loudly."""


class TransientDocumentError(Exception):
    """A passing problem with one document (a timeout, memory pressure): recorded in `failed_docs`
    (kind `transient`) and retried by later runs, at most `max_attempts` times."""


class ModelLoadError(Exception):
    """A head's model cannot be loaded; the message names the config key."""


class UntrainedHeadError(ModelLoadError):
    """The checkpoint lacks the head's task weights: transformers would fill them at random."""


class DatabaseBusy(Exception):
    """Another process holds the DuckDB file; transient, worth retrying."""


class DatabaseLocked(DatabaseBusy):
    """Another process holds the DuckDB file read-write (a DuckDB CLI, a plain `duckdb.connect(path)`), so
    not even reading is possible: a run gives up after `load_wait` with exit 75 (temporary failure)."""


class SchemaTooNew(Exception):
    """The database was written by a newer taskheads (or DuckDB) than this one; never touch it."""
