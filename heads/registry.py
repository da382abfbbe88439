"""Task name -> head class. A new head is one module plus one line here."""
from __future__ import annotations

from importlib import import_module

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


def head_class(task: str) -> type[Head]:
    try:
        target = HEADS[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(sorted(HEADS))}") from None
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)
