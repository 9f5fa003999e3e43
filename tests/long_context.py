"""A tiny random llama with a 2048-token window, and a ``LocalBackend`` on it: for tests whose prompts (programs'
stages, the navigator's blocks) outgrow the 128-token window of ``tiny.tiny_model``. Import the fixtures ``lm`` and
``be`` into a test module to use them."""

from __future__ import annotations

import pytest
import torch

from steerscale.scale import LocalBackend


def long_llama():
    import transformers
    from steerscale.models.layout import find_layout
    from tiny import FAMILIES

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**FAMILIES["llama"][1], "max_position_embeddings": 2048})
    model = transformers.LlamaForCausalLM(config).eval()
    return model, find_layout(model)


@pytest.fixture(scope="module")
def lm():
    return long_llama()


@pytest.fixture(scope="module")
def be(lm):
    from tiny import CharTokenizer

    return LocalBackend(lm[0], CharTokenizer(), lm[1], chat=False, max_n=32)
