"""steerscale's steering inside vLLM's worker process: where the edits attach in vLLM's model, and how each token
row of vLLM's packed batch gets its own request's edit, in eager and in compiled mode, on either model runner.

How it is wired (vLLM 0.32, V1 engine; every name below is vLLM's):

* ``register()`` is the ``vllm.general_plugins`` entry point (``pyproject.toml``). vLLM runs it in every process;
  it does nothing unless ``STEERSCALE_VLLM`` (or ``STEERSCALE_VLLM_VECTORS``) is set, so installing steerscale never
  changes another vLLM deployment. Set, it installs the front end's request checks (``frontend.py``) and wraps the
  model runners' ``load_model`` (the legacy runner, the V2 runner and their CPU subclasses): right after the model
  is loaded, before vLLM compiles or warms it up (or captures CUDA graphs), ``SteerState`` attaches its hooks and
  allocates its buffers, so a compiled graph contains them. The mode check runs there, on every runner.
* The edit at a site is one custom op, ``torch.ops.steerscale.steer(x, residual, site)``. torch.compile (vLLM's
  default mode) traces the hooks that call it and keeps the op opaque, so the op runs on every forward pass and
  reads the current step's plan: the same code in eager and compiled mode.
* Each step, where the runner starts the forward pass of a scheduled batch (``runners.py``: outside the compiled
  region and any CUDA graph), the step's plan is made from the runner's state (the scheduled requests, their prompt
  lengths and steer specs, the tokens' positions): per site a table (row 0 zeros; three rows per steered request:
  its edit at its early prompt tokens, at its last prompt token, at generated tokens, which is how the local
  engine's ``all``, ``prompt`` and ``generated`` scopes split a sequence), and one per-token index into it; after
  the pass it is dropped, so a dummy run reads none. Tables change only when the batch's composition (its requests
  and their steering) changes; the index every step. With chunked prefill and prefix caching on.
* Two forms of that plan (``STEERSCALE_VLLM_PLAN``): ``dynamic`` (``engine.plan.SteeringPlan``, tables built per
  composition, nothing run when no request in the step is steered), and ``static`` (``engine.plan.StaticPlan``:
  buffers allocated once and written in place, every stage run on every pass, so the kernels are the same whatever
  the step holds: LoRA's design, which is what a CUDA graph can replay). ``auto`` (the default) picks ``static``
  when CUDA graphs are on and ``dynamic`` otherwise. Both give the local engine's tokens (tests on CPU, compiled and
  eager, TP 1 and 2); the static plan under real CUDA graphs is untested here (no GPU with vLLM).
* A vLLM decoder layer takes ``(positions, hidden, residual)`` and returns ``(hidden, residual)``, the residual
  stream being their sum, so adding to ``hidden`` adds to the stream; projections and norms are taken on the sum.
* Tensor parallel: whole-stream sites are replicated on every rank (vLLM all-reduces the attention and MLP
  outputs), so every rank applies the same edit; a head's output lives on one rank (the output projection's input
  is split by heads), so only that rank edits it, in its local columns.
* ``SteerExtension`` (``worker_extension_cls``) adds RPCs for ``LLM.collective_rpc``. They never raise: each rank
  answers ``{"ok": ...}`` and ``SteeredLLM`` reads every rank's answer, so a refusal on one rank cannot leave
  another rank's reply unread for the next call.

Supported, per request entry (``steering.py``): ``Add`` (a scale; norm-preserving vectors rescale the stream to
its original norm, as ``engine.ops.apply_edit``), ``Ablate`` and ``SetProjection`` (``ablate``, ``=VALUE``: the
component along the vector's unit direction, on the whole residual stream) at ``resid_pre``, ``resid_post``,
``attn_out``, ``mlp_out`` and ``head_out``, in the request's order per site.

Compiled mode needs the hooked sites before compilation: the sites of ``STEERSCALE_VLLM_VECTORS`` and of the
vectors given to ``SteeredLLM(vectors=...)``, plus ``STEERSCALE_VLLM_SITES`` (``all`` or ``LAYER:KIND`` keys). A
vector registered later at another site is refused in compiled mode (eager mode hooks it on registration). The
static plan holds ``STEERSCALE_VLLM_STAGES`` entries per request (default 4; the front end enforces the same limit
in either plan) and ``STEERSCALE_VLLM_DIRECTIONS`` directions per site (default 64; a vector's direction and its
unit direction each take one). ``STEERSCALE_VLLM_PLAN=dynamic`` with CUDA graphs on is refused at start.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..engine.plan import StaticPlan, SteeringPlan, build_tables, request_slots, token_index
from ..engine.runtime import attach_hook
from ..errors import SteerscaleError
from ..models.layout import find_layout
from ..models.sites import Site, SiteKind
from . import frontend
from .frontend import GLOBAL_ENV, VECTORS_ENV, env_int, stages_per_request, vector_specs
from .runners import adapter_for
from .steering import parse_steer

log = logging.getLogger("steerscale.vllm")

ENABLE_ENV = "STEERSCALE_VLLM"
SITES_ENV = "STEERSCALE_VLLM_SITES"  # sites hooked before compilation: "all" or "LAYER:KIND[:HEAD],..."
PLAN_ENV = "STEERSCALE_VLLM_PLAN"  # "auto" (fixed buffers when CUDA graphs are on), "static" or "dynamic"
DIRECTIONS_ENV = "STEERSCALE_VLLM_DIRECTIONS"  # fixed-buffer plan: directions per site (default 64)
SUPPORTED = (SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.HEAD_OUT)


def enabled() -> bool:
    return bool(os.environ.get(ENABLE_ENV) or os.environ.get(VECTORS_ENV))


# -- the op ----------------------------------------------------------------------------------------------------------
_EDITS: dict[int, object] = {}  # site id -> the edit of the model runner that owns it (one runner per process)
_SITE_IDS = itertools.count()


@torch.library.custom_op("steerscale::steer", mutates_args=())
def steer_op(x: torch.Tensor, residual: torch.Tensor | None, site: int) -> torch.Tensor:
    """``x`` edited by the current step's plan at ``site`` (a copy of ``x`` where nothing applies): opaque to
    torch.compile, so the plan is read on every forward pass."""
    edit = _EDITS.get(site)
    out = edit(x, residual) if edit is not None else None
    return x.clone() if out is None else out


@steer_op.register_fake
def _(x, residual, site):
    return torch.empty_like(x)


class SteerState:
    """The steering of one model runner: registered vectors, engine-wide steering, the hooks, the step's plan."""

    def __init__(self, runner):
        self.runner = runner
        self.model = runner.get_model()
        self.layout = find_layout(self.model)
        self.vectors: dict = {}
        self.global_entries: list = []
        self.plan: SteeringPlan | None = None
        self.refused = 0  # steered requests the worker could not steer (the front end prevents this; counted)
        self._rows: dict = {}  # (request id, its steer spec) -> {site: {slot: (rows, targets)}}
        self._tables: tuple | None = None  # (batch composition, ops per site, device/dtype copies)
        self._site_ids: dict[Site, int] = {}
        self._handles: list = []
        self._refused_ids: set = set()
        self._check_mode()
        self._tensor_parallel()
        self.static: StaticPlan | None = None
        if self.static_mode:
            param = next(self.model.parameters())
            self.static = StaticPlan(
                {}, requests=int(runner.max_num_reqs), stages=stages_per_request(),
                directions=env_int(DIRECTIONS_ENV, 64), tokens=self._max_tokens(), device=param.device,
                dtype=param.dtype)
        for site in self._declared_sites():
            self._hook(site)
        # the step's plan is built where the runner starts a step's forward pass (outside the compiled region and
        # any CUDA graph), and dropped after it
        self.adapter = adapter_for(runner, self.prepare)
        for name, path in vector_specs(os.environ.get(VECTORS_ENV)):
            self.register(name, path.read_bytes())
        self.set_global(os.environ.get(GLOBAL_ENV) or None)

    def _check_mode(self) -> None:
        config = getattr(self.runner, "vllm_config", None)
        compilation = getattr(config, "compilation_config", None)
        mode = getattr(compilation, "mode", 0)
        self.compiled = mode not in (0, None) and str(mode).split(".")[-1] not in ("NONE", "0")
        cudagraphs = str(getattr(compilation, "cudagraph_mode", "NONE")).split(".")[-1]
        device = getattr(getattr(self.runner, "device", None), "type", "cpu")
        self.cuda_graphs = device == "cuda" and cudagraphs != "NONE" and not getattr(
            getattr(config, "model_config", None), "enforce_eager", False)
        plan = os.environ.get(PLAN_ENV, "auto").strip() or "auto"
        if plan not in ("auto", "static", "dynamic"):
            raise SteerscaleError(f"{PLAN_ENV}={plan!r}", "use auto, static or dynamic")
        if plan == "dynamic" and self.cuda_graphs:
            raise SteerscaleError(f"{PLAN_ENV}=dynamic builds each step's plan in Python, which CUDA graphs "
                                  f"(cudagraph_mode {cudagraphs}) would replay frozen",
                                  f"use {PLAN_ENV}=auto (fixed buffers under CUDA graphs), or turn the graphs off")
        # fixed buffers updated in place (what a replayed graph reads) where graphs run; elsewhere the plan built
        # per batch composition, which skips the work when no request in the step is steered
        self.static_mode = plan == "static" or (plan == "auto" and self.cuda_graphs)

    def _max_tokens(self) -> int:
        """The most tokens a forward pass holds: the scheduler's budget, or a larger CUDA graph capture size."""
        config = self.runner.vllm_config
        sizes = getattr(config.compilation_config, "cudagraph_capture_sizes", None) or [0]
        return max(int(self.runner.max_num_tokens), max(sizes))

    def _tensor_parallel(self) -> None:
        parallel = getattr(getattr(self.runner, "vllm_config", None), "parallel_config", None)
        self.tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        self.tp_rank = 0
        if self.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            self.tp_rank = get_tensor_model_parallel_rank()
            if self.layout.n_heads % self.tp_size:
                raise SteerscaleError(f"{self.layout.n_heads} heads do not split over {self.tp_size} ranks")

    def _declared_sites(self) -> list[Site]:
        """The sites hooked before compilation: the start vectors' and ``STEERSCALE_VLLM_SITES``."""
        sites: list[Site] = []
        spec = os.environ.get(SITES_ENV, "")
        if spec.strip() == "all":
            for layer in range(self.layout.n_layers):
                sites += [Site(layer, kind) for kind in SUPPORTED if kind is not SiteKind.HEAD_OUT]
                sites += [Site(layer, SiteKind.HEAD_OUT, head=h) for h in range(self.layout.n_heads)]
        else:
            for key in filter(None, (k.strip() for k in spec.split(","))):
                try:
                    sites.append(Site.parse(key))
                except (SteerscaleError, ValueError) as exc:
                    raise SteerscaleError(f"{SITES_ENV}: bad site {key!r} ({exc})",
                                          'write "all" or LAYER:KIND[:HEAD] keys, e.g. 14:resid_post') from None
        from ..steer.vector import SteeringVector

        for _, path in vector_specs(os.environ.get(VECTORS_ENV)):
            sites += SteeringVector.load(path).sites
        return sites

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
        for site in vec.sites:
            if site.kind not in SUPPORTED:
                raise SteerscaleError(f"vector {name!r} edits {site.kind.value} sites, which the vLLM path does not "
                                      f"support", f"use {', '.join(k.value for k in SUPPORTED)}")
            if self.compiled and site not in self._site_ids:
                raise SteerscaleError(f"vector {name!r} edits {site.key()}, which was not hooked before vLLM compiled "
                                      "the model", f"give the vector at start (SteeredLLM(vectors=...) or "
                                      f"{VECTORS_ENV}), list the site in {SITES_ENV}, or run with enforce_eager=True")
        self.vectors[name] = vec
        self._rows.clear()
        self._tables = None
        if self.static is not None:
            self.static.forget()
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
        self._tables = None
        if self.static is not None:
            self.static.forget()

    def set_global(self, spec) -> None:
        entries = parse_steer(spec)
        for name, _, _ in entries:
            self._vector(name)
        self.global_entries = entries
        self._rows.clear()
        self._tables = None
        if self.static is not None:
            self.static.forget()

    def _vector(self, name: str):
        if name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none"
            raise SteerscaleError(f"unknown steering vector {name!r}; registered in vLLM: {known}",
                                  "register it (SteeredLLM.register, or STEERSCALE_VLLM_VECTORS=NAME=PATH)")
        return self.vectors[name]

    # -- hooks ------------------------------------------------------------------------------------------------
    def _hook(self, site: Site) -> None:
        """Put the op at ``site`` (once); the op's edit reads ``self.plan``."""
        if site in self._site_ids:
            return
        loc = self.layout.locate(site)
        sid = next(_SITE_IDS)
        self._site_ids[site] = sid
        if self.static is not None:
            width = self.layout.site_dim(site) if site.kind is not SiteKind.HEAD_OUT else \
                self.layout.n_heads // self.tp_size * self.layout.head_dim
            self.static.add_site(site, width)
        _EDITS[sid] = lambda x, extra: self._edit(site, x, extra)

        if site.kind is SiteKind.RESID_PRE:
            def hook(module, args, kwargs):  # (positions, hidden, residual): the stream is hidden + residual
                extra = args[2] if len(args) > 2 else None
                return (args[0], steer_op(args[1], extra, sid), *args[2:]), kwargs
        elif site.kind is SiteKind.HEAD_OUT:
            def hook(module, args, kwargs):  # the output projection's input: this rank's heads side by side
                return (steer_op(args[0], None, sid), *args[1:]), kwargs
        else:
            def hook(module, args, output):  # a block's (hidden, residual), or attention's / the MLP's tensor
                if isinstance(output, tuple):
                    extra = output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None
                    return (steer_op(output[0], extra, sid), *output[1:])
                return steer_op(output, None, sid)

        self._handles.append(attach_hook(loc, hook))

    def _edit(self, site: Site, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor | None:
        if self.static is not None:  # the same kernels on every pass, steered or not (a graph may replay them)
            return self.static.edit(site, x, extra)
        plan = self.plan
        if plan is None or site not in plan.ops:
            return None
        return plan.edit(site, x, extra)  # the shared steering plan's code (engine/plan.py), in each request's order

    # -- the step -----------------------------------------------------------------------------------------------
    def _head_columns(self, site: Site) -> slice | None:
        """This rank's columns of ``site``'s head in the output projection's input (None: another rank's head)."""
        per_rank = self.layout.n_heads // self.tp_size
        local = site.head - self.tp_rank * per_rank
        if not 0 <= local < per_rank:
            return None
        d = self.layout.head_dim
        return slice(local * d, (local + 1) * d)

    def _columns(self, site: Site, direction: torch.Tensor) -> torch.Tensor | None:
        """A direction in the width this rank edits: a head's spans the output projection's input on this rank
        (None: another rank's head); every other site is replicated."""
        if site.kind is not SiteKind.HEAD_OUT:
            return direction
        cols = self._head_columns(site)
        if cols is None:
            return None
        full = torch.zeros(self.layout.n_heads // self.tp_size * self.layout.head_dim)
        full[cols] = direction
        return full

    def _request_rows(self, rid, spec) -> dict | None:
        """A request's edits per site as the steering plan takes them (``engine.plan.request_slots``); engine-wide
        entries come first. None when it is not steered."""
        key = (rid, spec if not isinstance(spec, list) else tuple(spec))
        if key not in self._rows:
            entries = [(self._vector(name), op, scope) for name, op, scope in self.global_entries + parse_steer(spec)]
            slots = self.static.request_stages if self.static is not None else request_slots
            self._rows[key] = slots(entries, self._columns) or None
        return self._rows[key]

    def _refuse(self, rid, exc: SteerscaleError) -> None:
        """Unreachable through vLLM's front end (``frontend.admit`` refuses such a request first); if a request
        still gets here its steering cannot run: logged and counted (``steerscale_info``)."""
        if rid not in self._refused_ids:
            self._refused_ids.add(rid)
            self.refused += 1
            log.error("steerscale: request %s is NOT steered: %s%s", rid, exc.problem,
                      f" ({exc.hint})" if exc.hint else "")

    def prepare(self, positions: torch.Tensor | None) -> None:
        """The plan of the forward pass about to run (None when no scheduled request is steered; ``positions``
        None: the step ended)."""
        self.plan = None
        batch = self.adapter.batch(positions) if positions is not None else None
        if batch is None:
            if self.static is not None:
                self.static.set_index(torch.zeros(0, dtype=torch.long))
            return
        req_ids, specs, prompt_lens, counts = batch
        if len(self._rows) > 2 * len(req_ids) + 64:  # finished requests' rows: keep only the batch's
            live = set(req_ids)
            self._rows = {k: v for k, v in self._rows.items() if k[0] in live}
        slot, rows = [], []
        for rid, spec in zip(req_ids, specs):
            r = None
            if spec or self.global_entries:
                try:
                    r = self._request_rows(rid, spec)
                except SteerscaleError as exc:
                    self._refuse(rid, exc)
            slot.append(len(rows) if r is not None else -1)
            if r is not None:
                rows.append(r)
        if not rows:
            if self.static is not None:
                self.static.set_index(torch.zeros(0, dtype=torch.long))
            return
        tok_req = torch.repeat_interleave(torch.arange(len(req_ids)), counts)
        pos = positions[: tok_req.shape[0]].cpu().long()
        index = token_index(torch.tensor(slot)[tok_req], pos, torch.tensor(prompt_lens)[tok_req])
        composition = tuple((rid, tuple(spec) if isinstance(spec, list) else spec)
                            for rid, spec, k in zip(req_ids, specs, slot) if k >= 0)
        if self.static is not None:  # rows written when the composition changes, the index every step
            if self._tables is None or self._tables[0] != composition:
                self.static.load(rows, index)
                self._tables = (composition, None)
            else:
                self.static.set_index(index)
            return
        if self._tables is None or self._tables[0] != composition:
            param = next(self.model.parameters())
            self._tables = (composition, build_tables(rows, param.device, param.dtype))
        self.plan = SteeringPlan(self._tables[1], index.to(positions.device))

    def info(self) -> dict:
        return {"vectors": {n: [s.key() for s in v.sites] for n, v in self.vectors.items()},
                "engine_wide": self.global_entries, "architecture": self.layout.architecture,
                "n_layers": self.layout.n_layers, "compiled": self.compiled, "runner": self.adapter.name,
                "tensor_parallel": self.tp_size, "rank": self.tp_rank, "hooked_sites": len(self._site_ids),
                "refused": self.refused, "plan": "static" if self.static is not None else "dynamic",
                "cuda_graphs": self.cuda_graphs}


def state_of(runner) -> SteerState:
    """The runner's ``SteerState``, made on first use (registers ``STEERSCALE_VLLM_VECTORS``)."""
    state = getattr(runner, "_steerscale", None)
    if state is None:
        state = runner._steerscale = SteerState(runner)
    return state


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the front end's checks, and hooks placed when a runner loads its
    model (before vLLM compiles it)."""
    if not enabled():
        return
    frontend.install()
    from .runners import runner_classes

    for cls in runner_classes():
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_steerscale", False):
            continue

        def load_model(self, *args, _load=load, **kwargs):
            out = _load(self, *args, **kwargs)
            state_of(self)  # hooks before compilation; vectors read now: a bad setup fails at start
            return out

        load_model._steerscale = True
        cls.load_model = load_model
    log.info("steerscale: per-request steering enabled in vLLM")


def _answer(fn, *args):
    """An RPC's answer: ``{"ok": True, "value": ...}`` or ``{"ok": False, "error": ...}`` (never raised: every rank
    must reply to every call, see the module docstring)."""
    try:
        return {"ok": True, "value": fn(*args)}
    except SteerscaleError as exc:
        return {"ok": False, "error": exc.problem, "hint": exc.hint}


class SteerExtension:
    """vLLM ``worker_extension_cls``: the RPCs ``SteeredLLM`` calls through ``LLM.collective_rpc``. Method names
    start with ``steerscale_`` so they never clash with the worker's own."""

    def steerscale_register(self, name: str, data: bytes) -> dict:
        return _answer(state_of(self.model_runner).register, name, data)

    def steerscale_unregister(self, name: str) -> dict:
        return _answer(state_of(self.model_runner).unregister, name)

    def steerscale_set_steering(self, spec) -> dict:
        return _answer(state_of(self.model_runner).set_global, spec)

    def steerscale_info(self) -> dict:
        return _answer(state_of(self.model_runner).info)


def vector_bytes(vector) -> bytes:
    """A ``SteeringVector`` as the bytes of its ``.safetensors`` file (what the RPC carries: never pickle)."""
    from ..steer.vector import SteeringVector

    if not isinstance(vector, SteeringVector):
        raise SteerscaleError(f"cannot register a {type(vector).__name__} in vLLM: it takes steering vectors",
                              "pass a SteeringVector or the path of a .safetensors / .gguf vector file; edits such "
                              "as Affine run in the local engine (steerscale.generate)")
    with tempfile.TemporaryDirectory() as tmp:
        return vector.save(Path(tmp) / "v.safetensors").read_bytes()


__all__ = ["SteerExtension", "SteerState", "register", "state_of", "steer_op", "vector_bytes"]
