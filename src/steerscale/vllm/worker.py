"""steerscale's steering inside vLLM's worker process: where the edits attach in vLLM's model, and how each token
row of vLLM's packed batch gets its own request's edit.

How it is wired (vLLM 0.32, V1 engine; every name below is vLLM's):

* ``register()`` is the ``vllm.general_plugins`` entry point (``pyproject.toml``). vLLM runs it in every process;
  it does nothing unless ``STEERSCALE_VLLM`` (or ``STEERSCALE_VLLM_VECTORS``) is set, so installing steerscale never
  changes another vLLM deployment. Set, it wraps ``GPUModelRunner._model_forward`` (the CPU runner inherits it):
  before each real forward pass (after vLLM has ordered the batch) the wrapper reads every scheduled request's
  ``sampling_params.extra_args["steer"]`` and builds the step's ``_Plan``; the hooks read the plan, and a forward
  pass without one (vLLM's warm-up and dummy runs) is left alone.
* The hooks are placed from ``models.layout.find_layout`` applied to vLLM's own module tree (``model.layers[i]``,
  ``self_attn``, ``o_proj``, ``mlp``: the same attribute paths as transformers'), so the site -> module mapping is
  the local engine's. What differs is the tensor convention: a vLLM decoder layer takes ``(positions, hidden,
  residual)`` and returns ``(hidden, residual)``, the residual stream being their sum, so adding to ``hidden`` adds
  to the stream; tokens are flat ``(tokens, dim)`` rows of many requests.
* In-graph form: per site one table of vectors (row 0 zeros; three rows per steered request: its edit at its early
  prompt tokens, at its last prompt token, at generated tokens, which is how the local engine's ``all``,
  ``prompt`` and ``generated`` scopes split a sequence), and one per-token index into it computed from vLLM's
  positions and each request's prompt length. The hook is ``h + table[index]``: plain tensor ops, the same for a
  prefill chunk, a decode row or a mix, with chunked prefill and prefix caching on.
* ``SteerExtension`` (``worker_extension_cls``) adds RPCs for ``LLM.collective_rpc``: register and remove vectors,
  engine-wide steering, and what the worker has. ``vllm serve`` without RPCs reads vectors from
  ``STEERSCALE_VLLM_VECTORS=NAME=PATH,...`` and engine-wide steering from ``STEERSCALE_VLLM_STEER``.

Supported, per request entry (``steering.py``): ``Add`` (a scale), ``Ablate`` and ``SetProjection`` (``ablate``,
``=VALUE``: the component along the vector's unit direction, taken on the whole residual stream, hidden +
residual) at ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` and ``head_out`` (tensor parallel size 1 for
``head_out``: heads are split across ranks otherwise), in the request's order per site. Needs
``enforce_eager=True``: with vLLM's compilation on (its default) Python hooks would be traced once, so the engine
refuses to start instead of steering wrongly.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.runtime import attach_hook
from ..errors import SteerscaleError
from ..models.layout import find_layout
from ..models.sites import Site, SiteKind
from .steering import STEER_KEY, parse_steer

log = logging.getLogger("steerscale.vllm")

ENABLE_ENV = "STEERSCALE_VLLM"
VECTORS_ENV = "STEERSCALE_VLLM_VECTORS"  # NAME=PATH,NAME=PATH: registered in every worker at start
GLOBAL_ENV = "STEERSCALE_VLLM_STEER"  # engine-wide steering, "NAME:SCALE[:SCOPE],..."
SUPPORTED = (SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.HEAD_OUT)
CLASSES = 3  # token classes per request: early prompt tokens, the last prompt token, generated tokens
_APPLIES = {"all": (True, True, True), "prompt": (True, True, False), "generated": (False, True, True)}


def enabled() -> bool:
    return bool(os.environ.get(ENABLE_ENV) or os.environ.get(VECTORS_ENV))


@dataclass
class _Op:
    """One edit slot at a site: ``add`` (``h + row``) or ``set`` (``h + (target - h . u) u``, ``u`` the row: a unit
    direction, or zeros where the edit does not apply). Rows: ``1 + 3 x steered requests``, row 0 zeros."""

    kind: str
    rows: torch.Tensor  # (1 + 3m, dim)
    targets: torch.Tensor | None  # (1 + 3m,) for "set"

    def apply(self, x: torch.Tensor, index: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """``x`` edited for each token's row; the stream is ``x + extra`` (a vLLM layer's residual) or ``x``."""
        rows = self.rows.to(x.device, x.dtype)[index]
        if self.kind == "add":
            return x + rows
        stream = x if extra is None else x + extra
        proj = (stream * rows).sum(-1, keepdim=True)
        return x + (self.targets.to(x.device, x.dtype)[index][:, None] - proj) * rows


@dataclass
class _Plan:
    """One forward pass's steering: per site its edit slots in order, and each token's row in their tables."""

    ops: dict[Site, list[_Op]]
    index: torch.Tensor  # (tokens,) long


class SteerState:
    """The steering of one model runner: registered vectors, engine-wide steering, the hooks, the step's plan."""

    def __init__(self, runner):
        self.runner = runner
        self.model = runner.get_model()
        self.layout = find_layout(self.model)
        self.vectors: dict = {}
        self.global_entries: list = []
        self.plan: _Plan | None = None
        self._rows: dict = {}  # (request id, its steer spec) -> {site: (3, dim)}
        self._handles: dict[Site, object] = {}
        self._refused: set = set()  # requests whose steer spec was refused (logged once)
        self._check_mode()
        for spec in filter(None, os.environ.get(VECTORS_ENV, "").split(",")):
            name, _, path = spec.partition("=")
            self.register(name.strip(), Path(path.strip()).read_bytes())
        self.set_global(os.environ.get(GLOBAL_ENV) or None)

    def _check_mode(self) -> None:
        config = getattr(self.runner, "vllm_config", None)
        mode = getattr(getattr(config, "compilation_config", None), "mode", 0)
        if mode not in (0, None) and str(mode).split(".")[-1] not in ("NONE", "0"):
            raise SteerscaleError(f"steerscale's vLLM steering needs eager mode, but vLLM compiles the model "
                                  f"(compilation mode {mode})", "start vLLM with enforce_eager=True (vllm serve "
                                                                "--enforce-eager)")
        parallel = getattr(config, "parallel_config", None)
        self.tensor_parallel = int(getattr(parallel, "tensor_parallel_size", 1) or 1)

    # -- vectors ----------------------------------------------------------------------------------------------
    def register(self, name: str, data: bytes) -> dict:
        """Register a steerscale ``.safetensors`` vector or a llama.cpp ``.gguf`` control vector (its bytes) as
        ``name``, checked against this model's layout."""
        from .. import steer  # noqa: F401 (the package registers the .gguf reader)
        from ..steer.vector import SteeringVector

        if not name:
            raise SteerscaleError("a vector needs a name")
        parse_steer(f"{name}:0")  # the name rule
        suffix = ".gguf" if data[:4] == b"GGUF" else ".safetensors"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"vector{suffix}"
            path.write_bytes(data)
            vec = SteeringVector.load(path)
        vec.check_compatible(self.layout)
        if vec.preserve_norm:  # the worker's batched edit is a plain add per row; rescaling is not implemented
            raise SteerscaleError(f"vector {name!r} ({vec.method}) rescales activations to their original norm, which "
                                  "the vLLM path does not do", "serve it with steerscale serve, or use a plain vector")
        for site in vec.sites:
            if site.kind not in SUPPORTED:
                raise SteerscaleError(f"vector {name!r} edits {site.kind.value} sites, which the vLLM path does not "
                                      f"support", f"use {', '.join(k.value for k in SUPPORTED)}")
            if site.kind is SiteKind.HEAD_OUT and self.tensor_parallel > 1:
                raise SteerscaleError(f"vector {name!r} edits single heads, which vLLM splits across "
                                      f"{self.tensor_parallel} ranks", "serve it with tensor_parallel_size=1")
        self.vectors[name] = vec
        self._rows.clear()
        for site in vec.sites:
            self._hook(site)
        return {"name": name, "sites": [s.key() for s in vec.sites]}

    def unregister(self, name: str) -> None:
        if name not in self.vectors:
            raise SteerscaleError(f"no vector {name!r} registered in vLLM", f"registered: {sorted(self.vectors)}")
        if any(entry[0] == name for entry in self.global_entries):
            raise SteerscaleError(f"vector {name!r} is in the engine-wide steering", "set_steering(None) first")
        del self.vectors[name]
        self._rows.clear()

    def set_global(self, spec) -> None:
        entries = parse_steer(spec)
        for name, _, _ in entries:
            self._vector(name)
        self.global_entries = entries
        self._rows.clear()

    def _vector(self, name: str):
        if name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none"
            raise SteerscaleError(f"unknown steering vector {name!r}; registered in vLLM: {known}",
                                  "register it (SteeredLLM.register, or STEERSCALE_VLLM_VECTORS=NAME=PATH)")
        return self.vectors[name]

    # -- hooks ------------------------------------------------------------------------------------------------
    def _hook(self, site: Site) -> None:
        if site in self._handles:
            return
        loc = self.layout.locate(site)

        def edit(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor | None:
            plan = self.plan
            if plan is None or site not in plan.ops:
                return None
            index, n_tokens = plan.index, x.shape[0]
            if index.shape[0] != n_tokens:  # padded tokens past the scheduled ones get row 0 (no edit)
                index = torch.nn.functional.pad(index[:n_tokens], (0, max(0, n_tokens - index.shape[0])))
            index = index.to(x.device)
            for op in plan.ops[site]:  # in the request's order, as the local engine runs them
                x = op.apply(x, index, extra)
            return x

        if site.kind is SiteKind.RESID_PRE:
            def hook(module, args, kwargs):  # (positions, hidden, residual): the stream is hidden + residual
                x = edit(args[1], args[2] if len(args) > 2 else None)
                return None if x is None else ((args[0], x, *args[2:]), kwargs)
        elif site.kind is SiteKind.HEAD_OUT:
            cols = loc.index

            def hook(module, args, kwargs):  # the output projection's input: the heads side by side
                head = edit(args[0][..., cols], None)
                if head is None:
                    return None
                x = args[0].clone()
                x[..., cols] = head
                return (x, *args[1:]), kwargs
        else:
            def hook(module, args, output):  # a block's (hidden, residual), or attention's / the MLP's tensor
                if isinstance(output, tuple):
                    x = edit(output[0], output[1] if len(output) > 1 and torch.is_tensor(output[1]) else None)
                    return None if x is None else (x, *output[1:])
                return edit(output, None)

        self._handles[site] = attach_hook(loc, hook)

    # -- the step -----------------------------------------------------------------------------------------------
    def _request_rows(self, rid, spec) -> dict | None:
        """A request's edits per site: ``{site: {(entry k, kind): (rows (3, dim), targets (3,) or None)}}``, the
        three rows for its early prompt tokens, last prompt token and generated tokens; engine-wide entries come
        first. None when it is not steered. Cached per request."""
        key = (rid, spec if not isinstance(spec, list) else tuple(spec))
        if key not in self._rows:
            entries = self.global_entries + parse_steer(spec)
            out: dict = {}
            for k, (name, op, scope) in enumerate(entries):
                on = torch.tensor(_APPLIES[scope], dtype=torch.float32)[:, None]
                for site, direction in self._vector(name).directions.items():
                    d = direction.float()
                    if isinstance(op, tuple):  # ("set", value): the unit direction, and its target per row
                        u = d / d.norm()
                        out.setdefault(site, {})[(k, "set")] = (on * u, on[:, 0] * op[1])
                    else:
                        out.setdefault(site, {})[(k, "add")] = (on * (op * d), None)
            self._rows[key] = out or None
        return self._rows[key]

    def _refuse(self, rid, exc: SteerscaleError) -> None:
        """A request whose steer spec cannot run (unknown vector, malformed entry) generates unsteered; vLLM's
        worker has no way to fail one request, so the error is logged once per request, loudly."""
        if rid not in self._refused:
            self._refused.add(rid)
            log.error("steerscale: request %s is NOT steered: %s%s", rid, exc.problem,
                      f" ({exc.hint})" if exc.hint else "")

    def prepare(self, positions: torch.Tensor | None) -> None:
        """The plan of the forward pass about to run (None when no scheduled request is steered)."""
        self.plan = None
        runner = self.runner
        n = runner.input_batch.num_reqs
        if not n or positions is None:
            return
        req_ids = runner.input_batch.req_ids[:n]
        if len(self._rows) > 2 * n + 64:  # finished requests' rows: keep only the batch's
            live = set(req_ids)
            self._rows = {k: v for k, v in self._rows.items() if k[0] in live}
        slot, plen, rows = [], [], []
        for rid in req_ids:
            state = runner.requests[rid]
            extra = getattr(state.sampling_params, "extra_args", None) or {}
            r = None
            if extra.get(STEER_KEY) or self.global_entries:
                try:
                    r = self._request_rows(rid, extra.get(STEER_KEY))
                except SteerscaleError as exc:  # one client's bad spec must not stop the engine for everyone
                    self._refuse(rid, exc)
            slot.append(len(rows) if r is not None else -1)
            plen.append(int(state.num_prompt_tokens))
            if r is not None:
                rows.append(r)
        if not rows:
            return
        qsl = runner.query_start_loc.cpu[: n + 1]
        counts = qsl[1:] - qsl[:-1]
        tok_req = torch.repeat_interleave(torch.arange(n), counts)
        pos = positions[: tok_req.shape[0]].cpu().long()
        p = torch.tensor(plen)[tok_req]
        cls = (pos >= p - 1).long() + (pos >= p).long()
        s = torch.tensor(slot)[tok_req]
        index = torch.where(s >= 0, 1 + CLASSES * s + cls, torch.zeros_like(s))
        ops: dict[Site, list[_Op]] = {}
        for site in {site for r in rows for site in r}:
            dim = self.layout.site_dim(site)
            slots = sorted({slot for r in rows for slot in r.get(site, {})})
            for slot in slots:
                parts, targets = [torch.zeros(1, dim)], [torch.zeros(1)]
                for r in rows:
                    vec, tgt = r.get(site, {}).get(slot, (torch.zeros(CLASSES, dim), None))
                    parts.append(vec)
                    targets.append(tgt if tgt is not None else torch.zeros(CLASSES))
                ops.setdefault(site, []).append(_Op(slot[1], torch.cat(parts),
                                                    torch.cat(targets) if slot[1] == "set" else None))
        self.plan = _Plan(ops, index)



def state_of(runner) -> SteerState:
    """The runner's ``SteerState``, made on first use (registers ``STEERSCALE_VLLM_VECTORS``)."""
    state = getattr(runner, "_steerscale", None)
    if state is None:
        state = runner._steerscale = SteerState(runner)
    return state


def register() -> None:
    """The ``vllm.general_plugins`` entry point: wrap the model runner's forward when steering is enabled."""
    if not enabled():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._model_forward, "_steerscale", False):
        return  # vLLM loads plugins once per process, but be safe
    forward = GPUModelRunner._model_forward
    load = GPUModelRunner.load_model

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        state = state_of(self)
        state.prepare(positions)
        try:
            return forward(self, input_ids, positions, *args, **kwargs)
        finally:
            state.plan = None

    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        state_of(self)  # eager mode checked and the vectors read now: a bad setup fails at start, not mid-request
        return out

    _model_forward._steerscale = True
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner.load_model = load_model
    log.info("steerscale: per-request steering enabled in vLLM's model runner")


class SteerExtension:
    """vLLM ``worker_extension_cls``: the RPCs ``SteeredLLM`` calls through ``LLM.collective_rpc``. Method names
    start with ``steerscale_`` so they never clash with the worker's own."""

    def steerscale_register(self, name: str, data: bytes) -> dict:
        return state_of(self.model_runner).register(name, data)

    def steerscale_unregister(self, name: str) -> None:
        state_of(self.model_runner).unregister(name)

    def steerscale_set_steering(self, spec) -> None:
        state_of(self.model_runner).set_global(spec)

    def steerscale_info(self) -> dict:
        state = state_of(self.model_runner)
        return {"vectors": {n: [s.key() for s in v.sites] for n, v in state.vectors.items()},
                "engine_wide": state.global_entries, "architecture": state.layout.architecture,
                "n_layers": state.layout.n_layers}


def vector_bytes(vector) -> bytes:
    """A ``SteeringVector`` as the bytes of its ``.safetensors`` file (what the RPC carries: never pickle)."""
    with tempfile.TemporaryDirectory() as tmp:
        return vector.save(Path(tmp) / "v.safetensors").read_bytes()


__all__ = ["SteerExtension", "SteerState", "register", "state_of", "vector_bytes"]
