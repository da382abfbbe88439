"""Shared fixtures: offline settings, tiny local models, one Prefect test harness per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import pytest  # noqa: E402

from taskheads.tiny_models import NER_LABELS, TOPIC_LABELS, build_bart, build_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per head task, built once for the session (seconds)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "classification": str(build_bert(root / "topic", "classification", labels=TOPIC_LABELS, max_len=64, seed=3)),
        "ner": str(build_bert(root / "ner", "ner", labels=NER_LABELS, max_len=64, seed=2)),
        "qa": str(build_bert(root / "qa", "qa", max_len=128, seed=5)),
        "translation": str(build_bart(root / "mt", max_len=64, seed=4)),
    }


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect API for the whole session (it costs ~10 s to start)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
