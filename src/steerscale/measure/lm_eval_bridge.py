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
"""

from __future__ import annotations

import sys

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

        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
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


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
