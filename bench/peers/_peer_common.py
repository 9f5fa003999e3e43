"""Helpers for scripts that run inside the peer venv (transformers 4.57, numpy 1.x, repeng, steering-vectors).

These scripts never import ``steerscale``: the main venv passes them the directory of the dequantized
SmolLM2 checkpoint (``~/.cache/steerscale/dequantized/<hash>/``), a standard HF checkpoint written by
transformers 5. Two of its fields are transformers-5-only and are adapted here:

* ``config.json`` carries ``rope_parameters: {rope_theta, rope_type}``; transformers 4.57 reads ``rope_theta``
  (and would silently fall back to 10000 instead of SmolLM2's 100000), so we copy it across.
* ``tokenizer_config.json`` names ``tokenizer_class: TokenizersBackend``, which 4.57 does not know; we build a
  ``PreTrainedTokenizerFast`` from ``tokenizer.json`` with the same special tokens and ``chat_template.jinja``.

All output is JSON on stdout (the last line), so the main venv can parse it; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

# bench/_common.py imports only the standard library, so the peer venv can share its helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import Timer, log  # noqa: E402,F401


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def load_tokenizer(model_dir: str | Path):
    from transformers import PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                  model_input_names=["input_ids", "attention_mask"], **special)
    template = model_dir / "chat_template.jinja"
    if template.exists():
        tok.chat_template = template.read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # as steerscale does: generation and last-token reads need the prompt end aligned
    return tok


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a transformers-5 checkpoint directory, loaded with transformers 4.57."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).eval()
    return model, load_tokenizer(model_dir)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(positive, negative) texts. The main venv writes these already formatted (chat template applied)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            out.append((obj["positive"], obj["negative"]))
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def decode_step_pairs(model, inputs: dict, attach, detach, n_pairs: int, cache_kw: str = "past_key_values") -> dict:
    """Noise-robust per-step overhead: alternate single decode steps without and with the steering attached.

    A prompt is prefilled once; each step feeds one token at a fixed cache length (the new KV entry is cropped
    off again), so every step does the same work. ``attach()``/``detach()`` are outside the timed region. Each
    pair is timed with the process's CPU clock (one torch thread: CPU time = work done, robust to other jobs on a
    shared machine); the result is the median over pairs of (plain seconds / steered seconds), i.e. the steered
    throughput relative to plain.
    """
    with torch.no_grad():
        # explicit position ids from the attention mask, as generate() computes them for left-padded rows
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        out = model(**inputs, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)
        step_pos = pos[:, -1:] + 1

        def step():
            model(input_ids=nxt, attention_mask=mask, position_ids=step_pos, use_cache=True, **{cache_kw: cache})
            cache.crop(-1)

        def timed(steered: bool) -> float:
            if steered:
                attach()
            try:
                t0 = time.process_time()
                step()
                return time.process_time() - t0
            finally:
                if steered:
                    detach()

        for _ in range(3):
            timed(False), timed(True)
        ratios, plain, steered = [], [], []
        for i in range(n_pairs):
            if i % 2 == 0:
                p = timed(False); s = timed(True)  # noqa: E702
            else:
                s = timed(True); p = timed(False)  # noqa: E702
            plain.append(p), steered.append(s), ratios.append(p / s)
    return {"ratio": median(ratios), "plain_ms": 1000 * median(plain), "steered_ms": 1000 * median(steered), "pairs": n_pairs}
