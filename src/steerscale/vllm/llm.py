"""``SteeredLLM``: vLLM's offline ``LLM`` with steerscale's steering, per request and engine-wide.

    from steerscale.vllm import SteeredLLM
    llm = SteeredLLM("smollm2-135m-instruct", vectors={"formal": "formal.safetensors"})
    outs = llm.generate(["The weather is"], SamplingParams(temperature=0, max_tokens=24),
                        steer=["formal:4"])          # one spec for every prompt, or one per prompt

Each prompt's steering travels in its ``SamplingParams.extra_args["steer"]`` and its prefix-cache salt is derived
from it (``steering.cache_salt``), so vLLM batches steered, unsteered and differently steered requests together
and never reuses KV computed under other steering. Needs vLLM (``scripts/make_vllm_venv.sh``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import SteerscaleError
from ..models.loading import checkpoint_dir
from .steering import STEER_KEY, cache_salt, format_steer, parse_steer
from .worker import ENABLE_ENV, vector_bytes

EXTENSION = "steerscale.vllm.worker.SteerExtension"


class SteeredLLM:
    """``SteeredLLM(model, vectors={name: SteeringVector | path}, steer=None, **llm_kwargs)``: ``model`` is a
    steerscale alias, a ``.gguf``, a directory or an HF id; ``steer`` is engine-wide steering (every request);
    ``llm_kwargs`` go to ``vllm.LLM`` (defaults: ``dtype="float32"``, ``enforce_eager=True``)."""

    def __init__(self, model: str, *, vectors: dict | None = None, steer=None, **llm_kwargs):
        if llm_kwargs.get("enforce_eager") is False:
            raise SteerscaleError("steerscale's vLLM steering needs enforce_eager=True",
                                  "vLLM's compiled graphs would trace the steering hooks once; drop enforce_eager")
        os.environ[ENABLE_ENV] = "1"  # vLLM's worker processes inherit it: the plugin wraps their model runner
        from vllm import LLM

        kwargs = {"dtype": "float32", "enforce_eager": True, "worker_extension_cls": EXTENSION, **llm_kwargs}
        self.llm = LLM(model=checkpoint_dir(model), **kwargs)
        self.digests: dict[str, str] = {}
        self.engine_wide: list = []
        for name, vec in (vectors or {}).items():
            self.register(name, vec)
        if steer:
            self.set_steering(steer)

    def register(self, name: str, vector) -> None:
        """Register a ``SteeringVector`` (or a ``.safetensors`` / ``.gguf`` file) in every worker as ``name``."""
        data = Path(vector).read_bytes() if isinstance(vector, (str, Path)) else vector_bytes(vector)
        self._rpc("steerscale_register", name, data)
        self.digests[name] = hashlib.sha256(data).hexdigest()[:16]

    def unregister(self, name: str) -> None:
        self._rpc("steerscale_unregister", name)
        self.digests.pop(name, None)

    def set_steering(self, steer) -> None:
        """Engine-wide steering, applied to every request before its own (None: none)."""
        entries = parse_steer(steer)
        self._rpc("steerscale_set_steering", format_steer(entries))
        self.engine_wide = entries

    def info(self) -> dict:
        return self._rpc("steerscale_info")

    def _rpc(self, method: str, *args):
        try:
            return self.llm.collective_rpc(method, args=args)[0]
        except SteerscaleError:
            raise
        except Exception as exc:  # the worker's SteerscaleError arrives wrapped by vLLM's RPC
            raise SteerscaleError(f"vLLM worker refused {method}: {exc}") from None

    def request(self, prompt, params, steer):
        """One prompt and its sampling parameters with ``steer`` attached (extra_args and cache salt)."""
        entries = parse_steer(steer)
        for name, _, _ in entries:
            if name not in self.digests:
                known = ", ".join(sorted(self.digests)) or "none"
                raise SteerscaleError(f"unknown steering vector {name!r}; registered: {known}",
                                      "SteeredLLM(..., vectors={name: vector}) or llm.register(name, vector)")
        params = params.clone()
        extra = dict(params.extra_args or {})
        if entries:
            extra[STEER_KEY] = format_steer(entries)
        params.extra_args = extra or None
        item = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
        salt = cache_salt(self.engine_wide + entries, self.digests,
                          prompt=item.get("prompt_token_ids", item.get("prompt")))
        if salt:
            item["cache_salt"] = salt
        return item, params

    def generate(self, prompts, sampling_params=None, *, steer=None, use_tqdm: bool = False):
        """``vllm.LLM.generate`` with ``steer``: one spec for every prompt, or a list with one per prompt."""
        from vllm import SamplingParams

        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params or SamplingParams()
        # one spec per prompt: a list of lists (or None); a list of strings or (name, op) tuples is one spec
        per_prompt = isinstance(steer, list) and len(steer) == len(prompts) and all(
            s is None or isinstance(s, list) for s in steer) and not _is_entry_list(steer)
        specs = steer if per_prompt else [steer] * len(prompts)
        pairs = [self.request(p, params[i] if isinstance(params, list) else params, s)
                 for i, (p, s) in enumerate(zip(prompts, specs))]
        outs = self.llm.generate([p for p, _ in pairs], [sp for _, sp in pairs], use_tqdm=use_tqdm)
        return outs[0] if single else outs


def _is_entry_list(steer) -> bool:
    """``["a:4", "b:-1"]`` (one spec) rather than ``[["a:4"], None]`` (one per prompt)."""
    return all(isinstance(s, str) for s in steer) and bool(steer)
