"""``SteeredLLM``: vLLM's offline ``LLM`` with steerscale's steering, per request and engine-wide.

    from steerscale.vllm import SteeredLLM
    llm = SteeredLLM("smollm2-135m-instruct", vectors={"formal": "formal.safetensors"})
    outs = llm.generate(["The weather is"], SamplingParams(temperature=0, max_tokens=24),
                        steer=["formal:4"])          # one spec for every prompt, or one per prompt

Each prompt's steering travels in its ``SamplingParams.extra_args["steer"]``; vLLM's front end (steerscale's plugin,
``frontend.py``) checks it and derives its prefix-cache salt from it, so vLLM batches steered, unsteered and
differently steered requests together and never reuses KV computed under other steering. Runs in vLLM's compiled
mode (its default) and in eager mode, bf16 by default. Needs vLLM (``scripts/make_vllm_venv.sh``). vLLM's CPU build
starts worker processes: run it from a script under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SteerscaleError
from ..models.loading import checkpoint_dir
from .frontend import REGISTRY, digest
from .steering import STEER_KEY, format_steer, parse_steer
from .worker import ENABLE_ENV, SITES_ENV, register, vector_bytes

EXTENSION = "steerscale.vllm.worker.SteerExtension"


class SteeredLLM:
    """``SteeredLLM(model, vectors={name: SteeringVector | path}, steer=None, sites=None, **llm_kwargs)``: ``model``
    is a steerscale alias, a ``.gguf``, a directory or an HF id; ``steer`` is engine-wide steering (every request);
    ``sites`` lists extra sites (``Site``s, ``"14:resid_post"`` keys or ``"all"``) to hook before vLLM compiles the
    model, for vectors registered later; ``llm_kwargs`` go to ``vllm.LLM`` (defaults: ``dtype="bfloat16"``, vLLM's
    compiled mode; ``dtype="float32"`` and ``enforce_eager=True`` are available)."""

    def __init__(self, model: str, *, vectors: dict | None = None, steer=None, sites=None, **llm_kwargs):
        vectors = {name: _vector(name, vec) for name, vec in (vectors or {}).items()}
        os.environ[ENABLE_ENV] = "1"  # vLLM's worker processes inherit it: the plugin wraps their model runner
        os.environ[SITES_ENV] = _site_keys(vectors.values(), sites)  # hooked before compilation
        from vllm import LLM

        register()  # this process's front end, whether or not vLLM loaded its plugins before ENABLE_ENV was set

        kwargs = {"dtype": "bfloat16", "worker_extension_cls": EXTENSION, **llm_kwargs}
        self.llm = LLM(model=checkpoint_dir(model), **kwargs)
        self.engine_wide: list = []
        for name, vec in vectors.items():
            self.register(name, vec)
        if steer:
            self.set_steering(steer)

    @property
    def digests(self) -> dict[str, str]:
        return REGISTRY.digests

    def register(self, name: str, vector) -> None:
        """Register a ``SteeringVector`` (or a ``.safetensors`` / ``.gguf`` file) in every worker as ``name``."""
        data = Path(vector).read_bytes() if isinstance(vector, (str, Path)) else vector_bytes(vector)
        self._rpc("steerscale_register", name, data)
        REGISTRY.digests[name] = digest(data)  # the front end admits and salts requests naming it

    def unregister(self, name: str) -> None:
        REGISTRY.digests.pop(name, None)  # refused by the front end first: no request can reach a missing vector
        self._rpc("steerscale_unregister", name)

    def set_steering(self, steer) -> None:
        """Engine-wide steering, applied to every request before its own (None: none)."""
        entries = parse_steer(steer)
        for name, _, _ in entries:
            REGISTRY.known(name, field="steer")
        self._rpc("steerscale_set_steering", format_steer(entries))
        REGISTRY.engine_wide = entries  # part of every request's cache salt from now on
        self.engine_wide = entries

    def info(self) -> dict:
        """What rank 0's worker has (vectors, engine-wide steering, compiled or eager, runner, hooked sites)."""
        return self._rpc("steerscale_info")

    def _rpc(self, method: str, *args):
        """Call ``method`` on every worker; each rank answers (never raises), and any rank's refusal is raised here
        after all answers are read."""
        answers = self.llm.collective_rpc(method, args=args)
        for rank, answer in enumerate(answers):
            if not answer.get("ok"):
                raise SteerscaleError(f"vLLM worker (rank {rank}) refused {method}: {answer['error']}",
                                      answer.get("hint"))
        return answers[0]["value"]

    def request(self, prompt, params, steer):
        """One prompt and its sampling parameters with ``steer`` attached (``extra_args``); the front end checks
        it and sets its cache salt."""
        entries = parse_steer(steer)
        for name, _, _ in entries:
            REGISTRY.known(name, field="steer")
        params = params.clone()
        extra = dict(params.extra_args or {})
        if entries:
            extra[STEER_KEY] = format_steer(entries)
        params.extra_args = extra or None
        item = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
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


def _vector(name: str, vector):
    """A start vector as a ``SteeringVector`` (its sites are hooked before compilation)."""
    from ..steer.vector import SteeringVector

    if isinstance(vector, (str, Path)):
        return SteeringVector.load(vector)
    vector_bytes(vector)  # a clear error for anything but a SteeringVector
    return vector


def _site_keys(vectors, sites) -> str:
    """``STEERSCALE_VLLM_SITES``: the start vectors' sites and the extra ``sites`` (``"all"`` wins)."""
    if sites == "all" or (isinstance(sites, (list, tuple)) and "all" in sites):
        return "all"
    keys = [s.key() for v in vectors for s in v.sites]
    keys += [s if isinstance(s, str) else s.key() for s in (sites or [])]
    return ",".join(dict.fromkeys(keys))
