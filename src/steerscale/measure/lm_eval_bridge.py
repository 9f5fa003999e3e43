"""A steered model as an lm-evaluation-harness model: run any lm-eval task under an intervention.

From Python::

    from steerscale.measure.lm_eval_bridge import SteeredLM
    lm = SteeredLM(model="smollm2-135m-instruct", steer="vec.safetensors:4", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

From lm-eval's own CLI (after ``import steerscale.measure.lm_eval_bridge`` registers it, e.g. via
``python -m steerscale.measure.lm_eval_bridge``, which forwards to ``lm_eval``)::

    python -m steerscale.measure.lm_eval_bridge --model steerscale \\
        --model_args model=smollm2-135m-instruct,steer=vec.safetensors:4 --tasks arc_easy

The interventions are active only inside lm-eval's forward and generate calls. lm-eval scores a context and a
continuation in one pass, so the token scope is ``all`` unless ``scope=`` says otherwise.

Device: the model runs where it is. A ``LoadedModel`` stays on its device; a model named by ``model=`` is loaded on
``device`` (default ``auto``: CUDA when there is one, else MPS, else the CPU). lm-eval's own command line would
send ``cuda:0`` whenever ``--device`` is not given, so ``main`` passes ``--device auto`` then.
"""

from __future__ import annotations

import sys

import torch

from ..engine.runtime import intervene
from ..errors import SteerscaleError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise SteerscaleError("lm-eval is not installed", "pip install lm-eval (or the dev extras)") from exc


@register_model("steerscale")
class SteeredLM(HFLM):
    """lm-eval's HF model with steerscale interventions around every model call.

    ``model``: a steerscale model name (alias, HF id, path, .gguf) or a ``LoadedModel``; ``steer``: ``path[:scale]``
    specs separated by ``|`` (or a list); ``scope``: token scope for the vectors; other kwargs go to ``HFLM``.
    """

    def __init__(self, model="smollm2-135m-instruct", steer=(), scope: str = "all", interventions=(), device="auto",
                 dtype="auto", **kwargs):
        from ..models.loading import LoadedModel, load_model
        from ..steer.vector import load_steering

        if isinstance(model, LoadedModel):
            loaded = model  # lm-eval then runs on the model's own device
        else:
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                raise SteerscaleError(f"device {device!r} was asked for, but this torch has no CUDA device",
                                      "leave the device out (auto: the GPU when there is one, else the CPU) "
                                      "or pass --device cpu")
            loaded = load_model(model, device=device, dtype=dtype)
        specs = [s for s in steer.split("|") if s] if isinstance(steer, str) else list(steer)
        self.layout = loaded.layout
        self.interventions = list(interventions) + load_steering(specs, loaded.layout, scope)
        kwargs.pop("pretrained", None)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with intervene(self.layout, self.interventions):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with intervene(self.layout, self.interventions):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def default_device_args(argv: list[str]) -> list[str]:
    """lm-eval's command-line arguments with ``--device auto`` added to an evaluation run that names no device, on
    the command line or in a ``--config`` file (lm-eval would send ``cuda:0``, which fails on a machine without
    CUDA); anything else (``ls``, ``validate``, ``--help``) is left as it is."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if not argv or argv[0] in ("ls", "validate") or flags & {"--device", "--config", "-C", "-h", "--help"}:
        return list(argv)
    return [*argv, "--device", "auto"]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``steerscale`` model registered and the device defaulting to ``auto``."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *default_device_args(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SteerscaleError as exc:
        print(f"steerscale: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
