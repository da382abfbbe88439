"""Head names and SQL identifiers: a head's name is an SQL struct in routing predicates, a column of
every result table and part of staged package names."""
from __future__ import annotations

import re

HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def quote(name: str) -> str:
    """An SQL identifier (column or head name) quoted for DuckDB; never used for values."""
    return '"' + name.replace('"', '""') + '"'
