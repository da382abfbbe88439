"""Fine-tuning a base encoder into the task heads the pipeline runs (classification, ner, qa).

Each trainer writes a normal HF folder that `heads.loading.load_head` loads, and evaluates the
saved folder through the same head code (`heads.engine.pipe`) that produces corpus results.
"""
from .heads import train_classifier, train_qa, train_token_classifier

__all__ = ["train_classifier", "train_token_classifier", "train_qa"]
