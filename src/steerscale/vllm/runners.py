"""The runner-specific part of steering inside vLLM: how one step's requests, their prompt lengths and steer specs,
and how many tokens each has in the step, are read from a model runner. One small adapter per runner; the rest of
``worker.py`` is the same for both.

Each adapter also calls ``on_step(positions)`` right before the runner's forward pass of a scheduled batch and
``on_step(None)`` after it: at the runner's level, not the model's, because with full CUDA graphs the model's own
forward (and any hook on it) does not run, the graph replays; and a warm-up or dummy run between steps then reads
no steering.

* ``LegacyRunner``: vLLM's V1 ``GPUModelRunner`` and its CPU subclass (``input_batch``, ``requests``,
  ``query_start_loc``; the step's forward is ``_model_forward``).
* ``V2Runner``: the V2 model runner (``vllm/v1/worker/gpu/model_runner.py``) and its CPU subclass. Its per-request
  state keeps no sampling parameters and its step's batch is a local variable, so the adapter records each new
  request's prompt length and steer spec in ``add_requests`` and the step's batch in ``prepare_inputs`` (where the
  step starts), and the step ends with ``execute_model``.
"""

from __future__ import annotations

from .steering import STEER_KEY


def runner_classes() -> list[type]:
    """The model runner classes the installed vLLM has (legacy and V2, GPU and CPU)."""
    import importlib

    out = []
    for module, name in [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
                         ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu.model_runner", "CPUModelRunner")]:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a build without this runner (or whose imports fail here)
            continue
    return out


def _spec(sampling_params):
    extra = getattr(sampling_params, "extra_args", None) or {}
    return extra.get(STEER_KEY)


class LegacyRunner:
    name = "v1"

    def __init__(self, runner, on_step):
        self.runner = runner
        forward = runner._model_forward

        def model_forward(*args, **kwargs):
            on_step(kwargs.get("positions", args[1] if len(args) > 1 else None))
            try:
                return forward(*args, **kwargs)
            finally:
                on_step(None)

        runner._model_forward = model_forward  # an instance attribute: this runner only, the class stays vLLM's

    def batch(self, positions):
        """``(request ids, steer specs, prompt lengths, tokens per request)`` of the step about to run, or None."""
        r = self.runner
        n = r.input_batch.num_reqs
        if not n or positions is None:
            return None
        req_ids = list(r.input_batch.req_ids[:n])
        states = [r.requests[rid] for rid in req_ids]
        qsl = r.query_start_loc.cpu[: n + 1]
        counts = qsl[1:] - qsl[:-1]
        if int(counts.sum()) > positions.shape[0]:  # a dummy run over a stale batch
            return None
        return (req_ids, [_spec(s.sampling_params) for s in states], [int(s.num_prompt_tokens) for s in states],
                counts)


class V2Runner:
    name = "v2"

    def __init__(self, runner, on_step):
        import torch

        self.torch = torch
        self.runner = runner
        self.requests: dict[str, tuple[int, object]] = {}  # request id -> (prompt length, steer spec)
        self.step = None  # the step's InputBatch
        add, prepare, remove = runner.add_requests, runner.prepare_inputs, runner._remove_request
        execute = runner.execute_model

        def add_requests(scheduler_output):
            for new in scheduler_output.scheduled_new_reqs:
                self.requests[new.req_id] = (int(new.prompt_len), _spec(new.sampling_params))
            return add(scheduler_output)

        def prepare_inputs(*args, **kwargs):
            self.step = prepare(*args, **kwargs)
            on_step(getattr(self.step, "positions", None))
            return self.step

        def execute_model(*args, **kwargs):
            try:
                return execute(*args, **kwargs)
            finally:
                on_step(None)

        def remove_request(req_id):
            self.requests.pop(req_id, None)
            return remove(req_id)

        # instance attributes: this runner only, the class stays vLLM's
        runner.add_requests, runner.prepare_inputs, runner._remove_request = add_requests, prepare_inputs, \
            remove_request
        runner.execute_model = execute_model

    def batch(self, positions):
        step = self.step
        self.step = None  # a later forward pass without a prepared batch (a dummy run) is not steered
        if step is None or positions is None or not step.num_reqs:
            return None
        n = step.num_reqs
        req_ids = list(step.req_ids[:n])
        if any(rid not in self.requests for rid in req_ids):
            return None
        qsl = self.torch.as_tensor(step.query_start_loc_np[: n + 1]).long()
        counts = qsl[1:] - qsl[:-1]
        if int(counts.sum()) > positions.shape[0]:
            return None
        return (req_ids, [self.requests[rid][1] for rid in req_ids], [self.requests[rid][0] for rid in req_ids],
                counts)


def adapter_for(runner, on_step):
    """The adapter of ``runner``'s kind (the V2 runner is the one with ``req_states``), calling ``on_step``."""
    return V2Runner(runner, on_step) if hasattr(runner, "req_states") else LegacyRunner(runner, on_step)
