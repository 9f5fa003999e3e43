"""Shared test setup: the tiny-model helpers live in ``tests/tiny.py``; fixtures used by several modules here."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def backend():
    """A ``LocalBackend`` on a tiny random llama with the one-character-per-token tokenizer (no chat template)."""
    from steerscale.scale import LocalBackend
    from tiny import CharTokenizer, tiny_model

    model, layout = tiny_model("llama")
    return LocalBackend(model, CharTokenizer(), layout, chat=False, max_n=32)
