"""The row a head reads: one corpus document routed to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Doc:
    """One corpus row routed to a head: its id, its text, and the other columns it may need."""

    doc_id: str
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)
