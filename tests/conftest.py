"""Shared test setup: the tiny-model helpers live in ``tests/tiny.py``; fixtures used by several modules here."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's `-n auto`) the workers share the cores: each takes its share of intra-op
    # threads, since torch's default (one per core in every worker) oversubscribes them and small forward passes
    # then wait at every barrier (src/steerscale/models/threads.py says why).
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may use, at most 4 (each loads its own copy of the models)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="module")
def backend():
    """A ``LocalBackend`` on a tiny random llama with the one-character-per-token tokenizer (no chat template)."""
    from steerscale.scale import LocalBackend
    from tiny import CharTokenizer, tiny_model

    model, layout = tiny_model("llama")
    return LocalBackend(model, CharTokenizer(), layout, chat=False, max_n=32)


def pytest_collection_finish(session):
    """Start the vLLM checks (subprocesses, one vLLM engine each on one core) in the background, so they overlap the
    rest of the suite (tests/test_vllm.py)."""
    if session.config.option.collectonly:
        return
    items = [item for item in session.items if getattr(getattr(item, "module", None), "__name__", "") == "test_vllm"]
    if items:
        items[0].module.start_in_background(items, session.config)


def pytest_sessionfinish(session, exitstatus):
    module = sys.modules.get("test_vllm")
    if module is not None:
        module.stop_background(session, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
