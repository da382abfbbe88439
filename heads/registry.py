"""Task name -> head class: the one list of heads. A new head is one module plus one line here
(or one call to `register`, e.g. from a test or a plugin).

Everything else derives from the head classes: config validation and the JSON Schema (`Params`),
the storage schema (`tables`, handed to storage as data: storage never imports heads).
"""
from __future__ import annotations

from importlib import import_module

from core.tables import ResultTable

from .base import Head

HEADS: dict[str, str] = {
    "classification": "heads.classification:ClassificationHead",
    "ner": "heads.ner:NerHead",
    "qa": "heads.qa:QuestionAnsweringHead",
    "translation": "heads.translation:TranslationHead",
    "multiple_choice": "heads.multiple_choice:MultipleChoiceHead",
    "causal_lm": "heads.causal_lm:CausalLMHead",
    "masked_lm": "heads.masked_lm:MaskedLMHead",
    "language": "heads.language:LanguageHead",
    "embedding": "heads.embedding:EmbeddingHead",
}


def register(task: str, target: str) -> None:
    """Add a head: `target` is "module:Class" (imported when first used)."""
    HEADS[task] = target


def head_class(task: str) -> type[Head]:
    try:
        target = HEADS[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(sorted(HEADS))}") from None
    module, _, name = target.partition(":")
    cls = getattr(import_module(module), name)
    if getattr(cls, "task", None) != task:
        raise TypeError(f"{target} declares task {getattr(cls, 'task', None)!r}, registered as {task!r}")
    return cls


def result_tables() -> list[ResultTable]:
    """Every result table the registered heads write, each once (a table two heads share, like
    lm_scores, must be declared once and imported by the other)."""
    tables: dict[str, ResultTable] = {}
    for task in HEADS:
        for table in head_class(task).tables:
            if tables.setdefault(table.name, table) != table:
                raise TypeError(f"result table {table.name} is declared twice, differently ({task} head)")
    return list(tables.values())


def table(name: str) -> ResultTable:
    """The declaration of one result table, by name."""
    for t in result_tables():
        if t.name == name:
            return t
    raise KeyError(f"no head writes a table {name!r}")
