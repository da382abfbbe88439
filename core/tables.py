"""The declaration of a result table, made by the head that writes it (heads/<task>.py).

The storage layer turns declarations into DDL, Arrow schemas for staging, `latest_<name>` views and
the struct a downstream head's `where` sees; it receives them as data (it never imports heads).
Every result table also has the key columns `head, doc_id` first and the lineage `run_id, model_id`
last, added by storage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")  # lower-case SQL identifiers: spliced into DDL and views


@dataclass(frozen=True)
class ResultTable:
    name: str  # an SQL identifier: the table, and `latest_<name>` its view
    columns: tuple[pa.Field, ...]  # the row a head's decode returns (nullable)
    # what a downstream head's `where` sees of a head writing here: one struct per document, named after
    # the head, as DuckDB struct fields aggregated over the head's rows `r` of that document (e.g.
    # "'label': any_value(r.label)"); None: nothing to route on (a `where` naming such a head is refused)
    upstream: str | None = None
    doc: str = ""  # one line for docs: what a row is

    def __post_init__(self) -> None:
        if not TABLE_NAME.match(self.name):
            raise ValueError(f"result table name {self.name!r}: must match [a-z_][a-z0-9_]*")
        names = [f.name for f in self.columns]
        clash = {"head", "doc_id", "run_id", "model_id"} & set(names)
        if clash or len(set(names)) != len(names):
            raise ValueError(f"result table {self.name}: columns repeat or shadow the key/lineage columns "
                             f"({', '.join(sorted(clash)) or 'repeated'})")
