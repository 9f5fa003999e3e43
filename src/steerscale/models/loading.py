"""``load_model``: one entry point for bundled aliases, HF ids, local directories and ``.gguf`` files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SteerscaleError
from .cache import gguf_cache_dir
from .layout import ModelLayout, find_layout
from .registry import BUNDLED, DEFAULT_MODEL, bundled_gguf_path
from .threads import refresh as refresh_threads

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What ``load_model`` returns; unpacks as ``model, tokenizer, layout = load_model(...)``."""

    model: Any
    tokenizer: Any
    layout: ModelLayout
    name: str
    load_seconds: float = 0.0
    from_cache: bool | None = None  # for GGUF: whether the dequantized cache was hit

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.layout))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # float32 on CPU: bf16 matmuls are slow on most CPUs and the models we bundle are small.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise SteerscaleError(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(table)}")
    return table[dtype]


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps the last prompt token in the last column, which generation and last-token reads need.
    tokenizer.padding_side = "left"
    return tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize once through transformers, then serve later loads from a safetensors cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = gguf_cache_dir(path)
    if (cache / "config.json").exists():
        from transformers.utils import logging as hf_logging

        # A cached load takes a few seconds; transformers' per-tensor progress bar is noise there.
        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        finally:
            hf_logging.enable_progress_bar()
        return model, tok, True
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many types for a damaged file
        raise SteerscaleError(
            f"could not read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}",
            "check that the file is a complete GGUF model (not a control vector) of an architecture transformers supports",
        ) from None
    # The weights are plain float tensors now; drop the GGUF "quantizer" so transformers will serialise them.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(str(path) + "\n")
        os.replace(tmp, cache)  # atomic: a half-written cache is never visible
    except OSError as exc:  # a read-only or full cache dir must not stop the load itself
        log.warning("could not write the dequantized cache to %s: %s", cache, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok, False


def _load_hf(name_or_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise SteerscaleError(
            f"could not load model {name_or_path!r}: {str(exc).splitlines()[0][:200]}",
            f"use a bundled alias ({', '.join(BUNDLED)}), a local directory, a .gguf file, "
            + ("or unset HF_HUB_OFFLINE to download" if offline else "or an HF model id reachable from this machine"),
        ) from None
    return model, tok


def checkpoint_dir(name_or_path: str = DEFAULT_MODEL) -> str:
    """What another engine (vLLM) loads for ``name_or_path``: a bundled alias or a ``.gguf`` file becomes its
    dequantized safetensors directory (written on first use, the one ``load_model`` reads); a directory or an HF
    id is returned as it is."""
    if name_or_path in BUNDLED or name_or_path.endswith(".gguf"):
        path = bundled_gguf_path(name_or_path) if name_or_path in BUNDLED else Path(name_or_path).expanduser()
        if not path.is_file():
            raise SteerscaleError(f"GGUF file not found: {path}", "check the path")
        cache = gguf_cache_dir(path)
        if not (cache / "config.json").exists():
            _load_gguf(path, torch.float32)
        if not (cache / "config.json").exists():
            raise SteerscaleError(f"could not write the dequantized checkpoint of {path} to {cache}",
                                  "make the cache writable ($STEERSCALE_CACHE)")
        return str(cache)
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Load a causal LM, its tokenizer and its layout.

    ``name_or_path`` is a bundled alias (see ``steerscale models``), an HF model id, a local model directory,
    or a path to a ``.gguf`` file (dequantized once and cached as safetensors, see ``models.cache``).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise SteerscaleError("empty model name", f"pass a bundled alias such as {DEFAULT_MODEL!r}, an HF id or a path")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    refresh_threads(dev, force=True)  # torch's CPU threads for this machine as it is now (models/threads.py)
    start = time.perf_counter()
    from_cache = None
    if name_or_path in BUNDLED:
        model, tok, from_cache = _load_gguf(bundled_gguf_path(name_or_path), dt)
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SteerscaleError(f"GGUF file not found: {path}", "check the path")
        model, tok, from_cache = _load_gguf(path, dt)
    elif Path(name_or_path).expanduser().exists():
        model, tok = _load_hf(str(Path(name_or_path).expanduser()), dt)
    elif "/" not in name_or_path:
        raise SteerscaleError(
            f"unknown model {name_or_path!r}: not a bundled alias, an existing path, or an HF id (org/name)",
            f"bundled aliases: {', '.join(BUNDLED)}; list them with `steerscale models`",
        )
    else:
        model, tok = _load_hf(name_or_path, dt)
    model = model.to(dev).eval()
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tok),
        layout=find_layout(model),
        name=name_or_path,
        load_seconds=time.perf_counter() - start,
        from_cache=from_cache,
    )
