"""RL of Thoughts: a small learned navigator that picks which reasoning block the model runs next (issue 27, item 2).

After "RL of Thoughts: Navigating LLM Reasoning with Inference-time Reinforcement Learning" (Hao et al., 2025): the
model's reasoning is built from a few *blocks*, each a prompt template run through the ``Backend`` interface, and a
small policy reads the state after each block and chooses the next one.

Blocks (``BLOCKS``):

* ``reason``: one more step of reasoning, appended to the work so far;
* ``decompose``: the problem broken into sub-questions (a plan), appended;
* ``debate``: two proposed solutions sampled from the work so far; the one the model's own self-evaluation prefers
  is appended (the other is dropped);
* ``refine``: the work so far checked and rewritten (replaces the work);
* ``stop``: the episode ends; when the work states no answer yet, one short answer call finishes it.

State features (``featurize``): the model's self-evaluation ``P(Yes)`` of the work so far (the ``self_eval``
verifier, one verifier pass), its change since the previous block, whether an answer is stated, the step, the work's
length, the previous block, how often each block ran, and the generator's mean log-prob of the last block's tokens.
``features="self_eval+hidden"`` adds the model's own hidden state (``backend.embed``: mean-pooled hidden states of
one layer, as the ``diverse`` verifier reads them) projected onto ``hidden_dims`` principal components fitted on
the training states; a backend that cannot embed (an HTTP server) is refused with a clear message, while the
default ``self_eval`` navigator needs only text and ``choice_logprobs``.

The policy is a two-layer MLP (``NavigatorPolicy``) trained by REINFORCE with a leave-one-out baseline (RLOO) and an
entropy bonus on a development split (``train_navigator``); the reward is the task's score of the final work minus
``token_cost`` per 100 generated tokens. The environment is deterministic given the seed (every block's sample is
seeded by the problem and the path of blocks that led to it), so a node of the block tree is run once and cached:
re-visiting it costs nothing and gives the same outcome it would give if it were run again.

The trained navigator is an artifact (``Navigator.save`` / ``Navigator.load``): safetensors with a JSON header, like
every steerscale artifact, never pickle. (Maintained RL libraries were considered: stable-baselines3 saves a zip of
pickled objects and ``torch.save`` state, TorchRL checkpoints are ``torch.save`` too; the policy here is a 2-layer
MLP over ~20 features and five actions, for which REINFORCE is a few lines, so no library is used and the saved
form is plain tensors.) This module sits in ``scale`` (it runs on the ``Backend`` interface), which may not import
``steer``, so it writes its file with ``safetensors`` directly, as the judge's meta probe does.

Applied as the ``navigator`` strategy (``run_navigator``: ``navigator=PATH``, or ``sequence=reason,refine`` for a
fixed block sequence, the baseline); trained from the CLI with ``steerscale navigator train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import SteerscaleError
from ..answers import extract_answer
from .backend import Candidate, SamplingParams, derive_seed
from .budget import Budget
from .strategies import STRATEGIES
from .strategies.base import Choice, Result, finish

FORMAT = "steerscale.navigator/1"
BLOCKS = ("reason", "decompose", "debate", "refine", "stop")
STOP = "stop"
FEATURE_KINDS = ("self_eval", "self_eval+hidden")
WORK_BLOCKS = tuple(b for b in BLOCKS if b != STOP)

TEMPLATES = {
    "reason": "{question}\n\n{work}Write only the next short step of the solution. If the answer is now known, end "
              "with 'Answer: <answer>'.",
    "decompose": "{question}\n\n{work}Do not solve it yet. Break the problem into short sub-questions, one per line.",
    "debate": "{question}\n\n{work}Propose a complete solution, ending with 'Answer: <answer>'.",
    "refine": "{question}\n\n{work}Check this work for mistakes and write a corrected, complete solution, ending "
              "with 'Answer: <answer>'.",
    "answer": "{question}\n\n{work}Give only the final answer, on one line, as 'Answer: <answer>'.",
}
_ANSWER_RE = re.compile(r"answer\s*:|\\boxed\{", re.IGNORECASE)  # what the templates ask for (and gym tasks read)
ANSWER_TOKENS = 16  # the stop block's answer call
N_HAND = 5 + len(WORK_BLOCKS) + 1 + len(WORK_BLOCKS) + 2  # the hand features (hand_features): 16


def parse_blocks(value, *, allow_empty: bool = False) -> tuple[str, ...]:
    """Block names from ``"reason,refine"`` or a list; an unknown name is a ``SteerscaleError`` listing the blocks."""
    if isinstance(value, str):
        names = [v.strip() for v in value.replace("|", ",").split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise SteerscaleError(f"blocks must be text such as 'reason,refine' or a list of names, got {value!r}")
    for name in names:
        if not isinstance(name, str) or name not in BLOCKS:
            import difflib

            close = difflib.get_close_matches(str(name), BLOCKS, n=1)
            raise SteerscaleError(f"unknown reasoning block {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                         else ""),
                                  f"blocks: {', '.join(BLOCKS)}")
    if not names and not allow_empty:
        raise SteerscaleError("no reasoning blocks given", f"name one or more of: {', '.join(BLOCKS)}")
    return tuple(names)


def has_answer(work: str) -> bool:
    return bool(_ANSWER_RE.search(work or ""))


# -- state ------------------------------------------------------------------------------------------------------
@dataclass
class State:
    """The work so far on one problem, and what the features read from it."""

    work: str = ""
    path: tuple[str, ...] = ()
    tokens: int = 0  # generated tokens of every block so far
    last_logprob: float = 0.0
    evals: list[float] = field(default_factory=list)  # self-evaluation after each block (None-free)
    finished: bool = False

    def child(self, block: str, work: str, tokens: int, logprob: float) -> "State":
        return State(work, self.path + (block,), self.tokens + tokens, logprob, list(self.evals), block == STOP)


def _work_section(work: str) -> str:
    return f"Work so far:\n{work.strip()}\n\n" if work.strip() else ""


def _sample(backend, prompt, n, params, budget, seed):
    cands = backend.sample(prompt, n, params, budget, seed=seed)
    return [c for c in cands if c.text.strip() or c.n_tokens]


def run_block(block: str, question: str, state: State, backend, budget: Budget, params: SamplingParams,
              seed: int | None) -> State:
    """Run one block on ``state``: a new state (the old one is not changed). Every sample is bought from ``budget``
    by the backend; a block the budget cannot pay for leaves the work as it was."""
    if block not in BLOCKS:
        parse_blocks([block])
    section = _work_section(state.work)
    if block == STOP:
        if has_answer(state.work) and state.work.strip():
            return state.child(STOP, state.work, 0, state.last_logprob)
        short = dataclasses.replace(params, max_tokens=min(params.max_tokens, ANSWER_TOKENS),
                                    min_tokens=min(params.min_tokens, ANSWER_TOKENS))
        out = _sample(backend, TEMPLATES["answer"].format(question=question, work=section), 1, short, budget, seed)
        if not out:
            return state.child(STOP, state.work, 0, state.last_logprob)
        text = (state.work.rstrip() + "\n" + out[0].text.strip()).strip()
        return state.child(STOP, text, out[0].n_tokens, out[0].mean_logprob)
    prompt = TEMPLATES[block].format(question=question, work=section)
    n = 2 if block == "debate" else 1
    out = _sample(backend, prompt, n, params, budget, seed)
    if not out:
        return state.child(block, state.work, 0, state.last_logprob)
    tokens = sum(c.n_tokens for c in out)
    pick = out[0]
    if block == "debate" and len(out) > 1:
        scores = self_evaluate(backend, question, [(state.work.rstrip() + "\n" + c.text.strip()).strip() for c in out],
                               budget)
        pick = out[max(range(len(out)), key=lambda i: (math.isfinite(scores[i]), scores[i] if math.isfinite(scores[i])
                                                        else -1.0, -i))]
    text = pick.text.strip()
    if block == "refine":
        work = text or state.work
    elif block == "decompose":
        work = (state.work.rstrip() + "\nPlan:\n" + text).strip()
    else:
        work = (state.work.rstrip() + "\n" + text).strip()
    return state.child(block, work, tokens, pick.mean_logprob)


def self_evaluate(backend, question: str, works: Sequence[str], budget: Budget) -> list[float]:
    """The ``self_eval`` verifier's ``P(Yes)`` of each text (one charged verifier pass each); NaN where unpaid."""
    from .verifiers.model_based import SelfEval

    cands = [Candidate(text=w) for w in works]
    try:
        return [float(s) for s in SelfEval(backend=backend).score_batch(question, cands, budget)]
    except (OverflowError, ValueError, TypeError):
        return [math.nan] * len(cands)


# -- features ---------------------------------------------------------------------------------------------------
def hand_features(state: State, evaluation: float, max_blocks: int) -> list[float]:
    """The text-and-self-evaluation features of a state (``N_HAND`` numbers, roughly in [-2, 2]): the self-evaluation
    and its change, answer stated, work empty, step / ``max_blocks``, the previous block (one-hot, or none), each
    block's count / ``max_blocks``, the work's length (characters / 400, at most 2), the last block's mean
    log-prob / 5 (at least -2)."""
    ev = evaluation if math.isfinite(evaluation) else 0.5
    prev = state.evals[-2] if len(state.evals) >= 2 else 0.5
    last = state.path[-1] if state.path else None
    scale = max(1, max_blocks)
    out = [ev, ev - prev, float(has_answer(state.work)), float(not state.work.strip()), len(state.path) / scale]
    out += [float(last == b) for b in WORK_BLOCKS] + [float(last is None)]
    out += [sum(p == b for p in state.path) / scale for b in WORK_BLOCKS]
    out += [min(2.0, len(state.work) / 400.0), max(-2.0, state.last_logprob / 5.0)]
    return out


@dataclass
class Observation:
    hand: list[float]
    hidden: torch.Tensor | None = None  # raw mean-pooled hidden state (before projection)


def observe(question: str, state: State, backend, budget: Budget, *, max_blocks: int, features: str,
            layer: int = -1) -> Observation:
    """What the navigator reads at a decision point: one self-evaluation pass (none while the work is empty), and,
    for ``self_eval+hidden``, one embedding pass (``backend.embed``)."""
    if state.work.strip():
        ev = self_evaluate(backend, question, [state.work], budget)[0]
    else:
        ev = 0.5
    state.evals.append(ev if math.isfinite(ev) else 0.5)
    hidden = None
    if features == "self_eval+hidden":
        text = f"{question}\n{state.work}".strip()
        try:
            hidden = backend.embed([text], budget, layer=layer)[0].float()
        except SteerscaleError as exc:
            raise SteerscaleError(f"this navigator reads the model's hidden states, which this backend cannot give "
                                  f"({exc.problem})",
                                  "run it on a LocalBackend or steerscale serve, or train a text-only navigator "
                                  "(--features self_eval)") from None
    return Observation(hand_features(state, ev, max_blocks), hidden)


# -- the policy and its artifact ----------------------------------------------------------------------------------
class NavigatorPolicy(torch.nn.Module):
    """Features -> one logit per block: Linear, tanh, Linear."""

    def __init__(self, n_in: int, n_hidden: int = 32, n_out: int = len(BLOCKS)):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(n_hidden, n_out))

    def forward(self, x):
        return self.net(x)


@dataclass
class Navigator:
    """A trained navigator: the policy, how its features are made, and the block settings it was trained with."""

    policy: NavigatorPolicy
    blocks: tuple[str, ...] = BLOCKS
    max_blocks: int = 3
    block_tokens: int = 48
    temperature: float = 0.7
    features: str = "self_eval"
    layer: int = -1
    hidden_mean: torch.Tensor | None = None  # (d,) hidden-state mean of the training states
    hidden_components: torch.Tensor | None = None  # (k, d) principal directions
    hidden_scale: torch.Tensor | None = None  # (k,) std of each projection
    info: dict = field(default_factory=dict)

    @property
    def n_in(self) -> int:
        return N_HAND + (0 if self.hidden_components is None else int(self.hidden_components.shape[0]))

    def vector(self, obs: Observation) -> torch.Tensor:
        x = torch.tensor(obs.hand, dtype=torch.float32)
        if self.features == "self_eval+hidden":
            if obs.hidden is None or self.hidden_components is None:
                raise SteerscaleError("this navigator needs the hidden state of each decision point")
            if obs.hidden.shape[-1] != self.hidden_components.shape[1]:
                raise SteerscaleError(f"this navigator reads {self.hidden_components.shape[1]}-dim hidden states, the "
                                      f"model gives {obs.hidden.shape[-1]}", "use the model it was trained on "
                                      f"({self.info.get('model', 'see its header')})")
            h = torch.nan_to_num(obs.hidden.float())
            z = (self.hidden_components @ (h - self.hidden_mean)) / self.hidden_scale
            x = torch.cat([x, z.clamp(-5, 5)])
        return x

    def mask(self, state: State, cap: int | None = None) -> torch.Tensor:
        """Allowed actions: the navigator's blocks; only ``stop`` once ``cap`` (default ``max_blocks``) blocks ran."""
        allowed = [b in self.blocks for b in BLOCKS]
        if len(state.path) >= (self.max_blocks if cap is None else cap):
            allowed = [b == STOP for b in BLOCKS]
        return torch.tensor(allowed)

    def distribution(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.policy(x).masked_fill(~mask, -1e9)
        return torch.softmax(logits, -1)

    # -- the artifact ----------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise SteerscaleError(f"a navigator is saved as a .safetensors file, got {str(path)!r}",
                                  "name it e.g. navigator.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"policy.{k}": v.detach().contiguous().float() for k, v in self.policy.state_dict().items()}
        if self.hidden_components is not None:
            tensors.update({"hidden.mean": self.hidden_mean.contiguous(), "hidden.components":
                            self.hidden_components.contiguous(), "hidden.scale": self.hidden_scale.contiguous()})
        header = {"format": FORMAT, "blocks": list(self.blocks), "max_blocks": self.max_blocks,
                  "block_tokens": self.block_tokens, "temperature": self.temperature, "features": self.features,
                  "layer": self.layer, "n_in": self.n_in, "n_hidden": int(self.policy.net[0].out_features),
                  "action_order": list(BLOCKS), "info": self.info}
        save_file(tensors, str(path), metadata={"steerscale": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path) -> "Navigator":
        from safetensors import safe_open

        remake = "train one with: steerscale navigator train --task gym:basic_arithmetic -o navigator.safetensors"
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise SteerscaleError(f"navigator file {str(path)!r} not found", remake)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            header = json.loads(meta.get("steerscale", "{}"))
        except Exception as exc:
            raise SteerscaleError(f"cannot read navigator {str(path)!r} ({type(exc).__name__}: {exc})",
                                  "it must be a safetensors file written by Navigator.save; " + remake) from None
        if header.get("format") != FORMAT:
            raise SteerscaleError(f"{str(path)!r} is not a navigator (format {header.get('format')!r}, expected "
                                  f"{FORMAT!r})", remake)
        if header.get("action_order") != list(BLOCKS):
            raise SteerscaleError(f"navigator {str(path)!r} was trained over blocks {header.get('action_order')}, "
                                  f"this version runs {list(BLOCKS)}", remake)
        blocks = parse_blocks(header["blocks"])
        features = header.get("features")
        if features not in FEATURE_KINDS:
            raise SteerscaleError(f"navigator {str(path)!r} has unknown features {features!r}", remake)
        n_in, n_hidden = int(header["n_in"]), int(header["n_hidden"])
        policy = NavigatorPolicy(n_in, n_hidden)
        try:
            policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
        except RuntimeError as exc:
            raise SteerscaleError(f"navigator {str(path)!r} is damaged: its policy tensors do not fit its header "
                                  f"({str(exc).splitlines()[0]})", remake) from None
        nav = cls(policy.eval(), blocks, int(header["max_blocks"]), int(header["block_tokens"]),
                  float(header["temperature"]), features, int(header.get("layer", -1)), tensors.get("hidden.mean"),
                  tensors.get("hidden.components"), tensors.get("hidden.scale"), dict(header.get("info") or {}))
        if nav.n_in != n_in:
            raise SteerscaleError(f"navigator {str(path)!r} is damaged: {nav.n_in} features made, {n_in} expected",
                                  remake)
        return nav


# -- one episode ------------------------------------------------------------------------------------------------
Chooser = Callable[[State, Observation], str]


def run_episode(question: str, backend, budget: Budget, *, choose: Chooser, max_blocks: int, params: SamplingParams,
                features: str = "self_eval", layer: int = -1, seed: int | None = 0, feature_blocks: int | None = None,
                on_step: Callable | None = None, observing: bool = True) -> State:
    """Blocks chosen by ``choose(state, observation)`` until ``stop`` (forced after ``max_blocks`` blocks, or when
    the budget is spent). Every block is seeded by ``seed`` and the path of blocks before it. ``feature_blocks``:
    the ``max_blocks`` the features are scaled by (a navigator's training setting; default ``max_blocks``).
    ``observing=False``: no features are read (a fixed sequence needs none; ``choose`` gets ``None``)."""
    state = State()
    while True:
        if budget.exhausted:
            block = STOP
        elif len(state.path) >= max_blocks:
            block = STOP
        else:
            obs = observe(question, state, backend, budget, max_blocks=feature_blocks or max_blocks, features=features,
                          layer=layer) if observing else None
            block = choose(state, obs)
            if block not in BLOCKS:
                parse_blocks([block])
        new = run_block(block, question, state, backend, budget, params, derive_seed(seed, "nav", *state.path, block))
        if on_step is not None:
            on_step(state, block, new)
        state = new
        if block == STOP:
            return state


# -- the strategy -------------------------------------------------------------------------------------------------
class NavigatorRef(Choice):
    """Navigator: a .safetensors file written by steerscale navigator train."""

    NONE = ""

    @classmethod
    def parse(cls, value) -> str:
        if not isinstance(value, str):
            raise SteerscaleError(f"navigator must be a file path, got {value!r}")
        if value:
            Navigator.load(value)  # checked when the request is parsed: a bad file is refused before model work
        return value


class BlockSequence(Choice):
    """Block sequence: block names, e.g. reason,refine (run in order, then stop)."""

    NONE = ""

    @classmethod
    def parse(cls, value) -> str:
        return ",".join(parse_blocks(value, allow_empty=True))


def run_navigator(prompt, backend, verifier, budget, *, navigator=NavigatorRef.NONE, sequence=BlockSequence.NONE,
                  max_blocks=0, sample=False, seed=0, answer_fn=None, **knobs) -> Result:
    """The ``navigator`` strategy: a trained navigator (``navigator=PATH``) picks each block, or a fixed
    ``sequence`` (``reason,refine``) runs in order and stops. ``max_blocks`` (0: the navigator's own, or the
    sequence's length) caps the blocks before ``stop``; ``sample=true`` samples the policy instead of taking its
    most likely block. Sampling knobs (``max_tokens``: tokens per block; ``temperature``) default to the
    navigator's training settings. A verifier, when given, scores the final work (it does not steer the choice)."""
    from .strategies.base import sampling_params

    navigator, sequence = str(navigator or ""), BlockSequence.parse(sequence or "")
    if bool(navigator) == bool(sequence):
        raise SteerscaleError("the navigator strategy needs exactly one of navigator=PATH (a trained navigator) "
                              "or sequence=BLOCKS (a fixed block sequence)",
                              "e.g. --knob navigator=navigator.safetensors, or --knob sequence=reason,refine; "
                              "train one with: steerscale navigator train")
    if not isinstance(max_blocks, int) or isinstance(max_blocks, bool) or not 0 <= max_blocks <= 16:
        raise SteerscaleError(f"max_blocks must be an integer in 0..16, got {max_blocks!r}")
    nav = Navigator.load(navigator) if navigator else None
    defaults = {"max_tokens": nav.block_tokens if nav else 48, "temperature": nav.temperature if nav else 0.7}
    params = sampling_params(**{**defaults, **knobs})
    fn = answer_fn or extract_answer
    probs_log: list[dict] = []
    if nav is not None:
        cap = max_blocks or nav.max_blocks
        gen = torch.Generator().manual_seed(int(derive_seed(seed, "policy") or 0))

        def choose(state, obs):
            with torch.no_grad():
                p = nav.distribution(nav.vector(obs), nav.mask(state, cap))
            i = int(torch.multinomial(p, 1, generator=gen)) if sample else int(p.argmax())
            probs_log.append({b: round(float(x), 4) for b, x in zip(BLOCKS, p)})
            return BLOCKS[i]
        features, layer = nav.features, nav.layer
    else:
        seq = list(parse_blocks(sequence))
        seq = seq[: seq.index(STOP)] if STOP in seq else seq  # nothing runs after stop
        seq = seq[: max_blocks] if max_blocks else seq
        cap = len(seq)

        def choose(state, obs):
            return seq[len(state.path)] if len(state.path) < len(seq) else STOP
        features, layer = "self_eval", -1
    t0 = time.perf_counter()
    final = run_episode(prompt, backend, budget, choose=choose, max_blocks=cap, params=params, features=features,
                        layer=layer, seed=seed, feature_blocks=nav.max_blocks if nav else None,
                        observing=nav is not None)
    cand = Candidate(text=final.work, finished=True, finish_reason="stop", answer=fn(final.work),
                     meta={"blocks": list(final.path), "tokens": final.tokens,
                           "self_evals": [round(e, 4) for e in final.evals]})
    failures = []
    if verifier is not None:
        from .verifiers import score_candidates

        failures = score_candidates(verifier, prompt, [cand], budget)
    info = {"blocks": list(final.path), "mode": "navigator" if nav else "sequence",
            "seconds": round(time.perf_counter() - t0, 3)}
    if nav is not None:
        info["policy"] = probs_log
    return finish("navigator", cand.answer, cand, [cand], budget, failures, **info)


# registered here, not in strategies/__init__.py (as the "program" strategy is): ``steerscale.scale`` imports this
# module
STRATEGIES.add("navigator", run_navigator, "RL of Thoughts: a trained navigator picks each reasoning block (reason, "
               "decompose, debate, refine, stop); or a fixed block sequence")


# -- training -----------------------------------------------------------------------------------------------------
@dataclass
class NavProblem:
    """One training problem: its prompt and the reward of a final work (the task's score, in [0, 1])."""

    id: str
    prompt: str
    reward: Callable[[str], float]


@dataclass
class TrainConfig:
    """Settings of ``train_navigator`` (all checked in ``__post_init__``)."""

    blocks: tuple[str, ...] = BLOCKS
    max_blocks: int = 2
    block_tokens: int = 48
    temperature: float = 0.7
    features: str = "self_eval"
    layer: int = -1
    hidden_dims: int = 4
    n_hidden: int = 32
    epochs: int = 30
    episodes: int = 4
    explore: int = 2
    lr: float = 0.03
    token_cost: float = 0.0
    entropy: float = 0.01
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self):
        self.blocks = parse_blocks(self.blocks)
        if STOP not in self.blocks:
            raise SteerscaleError("a navigator's blocks must include 'stop'", f"e.g. {','.join(BLOCKS)}")
        if self.features not in FEATURE_KINDS:
            raise SteerscaleError(f"unknown navigator features {self.features!r}",
                                  f"use one of: {', '.join(FEATURE_KINDS)}")
        for name, lo, hi in (("max_blocks", 1, 16), ("block_tokens", 1, 4096), ("hidden_dims", 1, 64),
                             ("n_hidden", 1, 1024), ("epochs", 0, 100000), ("episodes", 2, 1024), ("explore", 0, 1024)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SteerscaleError(f"navigator {name} must be an integer in {lo}..{hi}, got {v!r}")
        for name in ("temperature", "lr", "token_cost", "entropy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SteerscaleError(f"navigator {name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise SteerscaleError(f"navigator lr must be > 0, got {self.lr!r}")


class BlockTree:
    """Each problem's tree of block sequences, expanded lazily: a node (problem, path) is run once (seeded by the
    problem and the path, so running it again would give the same work) and cached with its observation. Every
    model call is bought from ``budget``."""

    def __init__(self, problems: Sequence[NavProblem], backend, config: TrainConfig, budget: Budget | None = None):
        if not problems:
            raise SteerscaleError("a navigator needs at least one training problem")
        self.problems, self.backend, self.config = list(problems), backend, config
        self.budget = budget if budget is not None else Budget()
        self.params = SamplingParams(max_tokens=config.block_tokens, temperature=config.temperature)
        self.nodes: dict = {}  # (i, path) -> State
        self.obs: dict = {}  # (i, path) -> Observation (decision points)
        self.rewards: dict = {}  # (i, path) -> reward of the finished work (path ends with stop)

    def _seed(self, i: int):
        return derive_seed(self.config.seed, "navigator-train", self.problems[i].id)

    def state(self, i: int, path: tuple[str, ...]) -> State:
        key = (i, path)
        if key not in self.nodes:
            if not path:
                state = State()
            else:
                parent = self.state(i, path[:-1])
                if path[:-1] and path[-2] == STOP:
                    raise SteerscaleError("no block runs after stop")
                if len(path) - 1 < self.config.max_blocks:  # the parent was a decision point: evaluated first
                    self.observation(i, path[:-1])
                state = run_block(path[-1], self.problems[i].prompt, parent, self.backend, self.budget, self.params,
                                  derive_seed(self._seed(i), "nav", *path))
            self.nodes[key] = state
        return self.nodes[key]

    def observation(self, i: int, path: tuple[str, ...]) -> Observation:
        key = (i, path)
        if key not in self.obs:
            c = self.config
            self.obs[key] = observe(self.problems[i].prompt, self.state(i, path), self.backend, self.budget,
                                    max_blocks=c.max_blocks, features=c.features, layer=c.layer)
        return self.obs[key]

    def outcome(self, i: int, path: tuple[str, ...]) -> tuple[float, int]:
        """(reward, generated tokens) of the finished work ``path`` (+ stop)."""
        full = path if path and path[-1] == STOP else path + (STOP,)
        if (i, full) not in self.rewards:
            state = self.state(i, full)
            score = float(self.problems[i].reward(state.work))
            if not math.isfinite(score):
                raise SteerscaleError(f"the reward of problem {self.problems[i].id!r} is {score!r}, not a number")
            self.rewards[(i, full)] = score
        state = self.nodes[(i, full)]
        return self.rewards[(i, full)], state.tokens

    def reward(self, i: int, path: tuple[str, ...]) -> float:
        score, tokens = self.outcome(i, path)
        return score - self.config.token_cost * tokens / 100.0

    def rollout(self, i: int, choose: Callable[[tuple, Observation], str]) -> tuple[tuple[str, ...], list]:
        """One episode on problem ``i``: the path and the decisions ``[(path before, observation, block)]``."""
        path: tuple[str, ...] = ()
        steps = []
        while len(path) < self.config.max_blocks and not self.budget.exhausted:
            obs = self.observation(i, path)
            block = choose(path, obs)
            steps.append((path, obs, block))
            if block == STOP:
                return path + (STOP,), steps
            path = path + (block,)
        return path + (STOP,), steps

    def sequence_scores(self, sequence: Sequence[str]) -> list[float]:
        """The task score of a fixed block sequence on every problem (no token cost)."""
        seq = tuple(b for b in sequence if b != STOP)[: self.config.max_blocks]
        return [self.outcome(i, seq)[0] for i in range(len(self.problems))]


def all_sequences(blocks: Sequence[str], max_blocks: int) -> list[tuple[str, ...]]:
    """Every fixed block sequence of at most ``max_blocks`` work blocks (then stop), shortest first."""
    work = [b for b in blocks if b != STOP]
    out: list[tuple[str, ...]] = [()]
    frontier: list[tuple[str, ...]] = [()]
    for _ in range(max_blocks):
        frontier = [p + (b,) for p in frontier for b in work]
        out += frontier
    return out


def _fit_hidden(states: list[torch.Tensor], k: int):
    x = torch.stack([torch.nan_to_num(s.float()) for s in states])
    mean = x.mean(0)
    centred = x - mean
    k = max(1, min(k, x.shape[0] - 1 if x.shape[0] > 1 else 1, x.shape[1]))
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    comps = v[:k].contiguous()
    scale = (centred @ comps.T).std(0, unbiased=False) + 1e-6 if x.shape[0] > 1 else torch.ones(k)
    return mean.contiguous(), comps, scale.contiguous()


def train_navigator(problems: Sequence[NavProblem], backend, *, budget: Budget | None = None, tree: BlockTree | None
                    = None, progress: Callable[[dict], None] | None = None, info: dict | None = None,
                    **settings) -> tuple[Navigator, BlockTree]:
    """Train a navigator on ``problems`` (a development split) with ``backend``'s model: ``explore`` uniformly random
    episodes per problem, then the hidden-state projection (``self_eval+hidden``), then ``epochs`` of REINFORCE: per
    problem ``episodes`` episodes sampled from the policy, each episode's advantage its reward minus the mean reward
    of the problem's other episodes (RLOO), one Adam step per epoch on ``-(advantage x log-prob) - entropy x H``.
    Returns the navigator (its ``info`` holds the reward curve) and the block tree (the cached episodes: fixed
    sequences can be scored on it). Settings: the fields of ``TrainConfig``."""
    unknown = sorted(set(settings) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise SteerscaleError(f"unknown navigator setting(s) {', '.join(unknown)}",
                              f"settings: {', '.join(TrainConfig.__dataclass_fields__)}")
    config = TrainConfig(**settings)
    tree = tree if tree is not None else BlockTree(problems, backend, config, budget)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    allowed = [b for b in config.blocks]

    def uniform(path, obs):
        return rng.choice(allowed)

    for _ in range(config.explore):
        for i in range(len(tree.problems)):
            tree.rollout(i, uniform)
    if config.features == "self_eval+hidden":
        hidden = [o.hidden for o in tree.obs.values() if o.hidden is not None]
        if not hidden:
            raise SteerscaleError("no hidden states were read to fit the navigator's projection",
                                  "use explore >= 1 and a budget that pays for them")
        h_mean, h_comps, h_scale = _fit_hidden(hidden, config.hidden_dims)
    else:
        h_mean = h_comps = h_scale = hidden = None
    n_in = N_HAND + (0 if h_comps is None else int(h_comps.shape[0]))
    nav = Navigator(NavigatorPolicy(n_in, config.n_hidden), config.blocks, config.max_blocks, config.block_tokens,
                    float(config.temperature), config.features, config.layer, h_mean, h_comps, h_scale)
    opt = torch.optim.Adam(nav.policy.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)

    def sampled(path, obs):
        with torch.no_grad():
            p = nav.distribution(nav.vector(obs), nav.mask(State(path=path)))
        return BLOCKS[int(torch.multinomial(p, 1, generator=gen))]

    history = []
    stopped_early = False
    for epoch in range(config.epochs):
        if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
            stopped_early = True
            break
        xs, masks, actions, advantages, rewards = [], [], [], [], []
        for i in rng.sample(range(len(tree.problems)), len(tree.problems)):
            eps = [tree.rollout(i, sampled) for _ in range(config.episodes)]
            rs = [tree.reward(i, path) for path, _ in eps]
            rewards += rs
            for k, (path, steps) in enumerate(eps):
                adv = rs[k] - (sum(rs) - rs[k]) / (len(rs) - 1)
                for before, obs, block in steps:
                    xs.append(nav.vector(obs))
                    masks.append(nav.mask(State(path=before)))
                    actions.append(BLOCKS.index(block))
                    advantages.append(adv)
        if not xs:
            break
        logits = nav.policy(torch.stack(xs)).masked_fill(~torch.stack(masks), -1e9)
        logp = torch.log_softmax(logits, -1)
        chosen = logp.gather(1, torch.tensor(actions)[:, None])[:, 0]
        probs = logp.exp()
        ent = -(probs * logp.masked_fill(~torch.stack(masks), 0.0)).sum(-1)
        loss = -(torch.tensor(advantages) * chosen).mean() - config.entropy * ent.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"epoch": epoch, "mean_reward": round(sum(rewards) / len(rewards), 4),
               "entropy": round(float(ent.mean().detach()), 4), "nodes": len(tree.nodes),
               "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        if progress is not None:
            progress(row)
    nav.policy.eval()
    nav.info = {**(info or {}), "problems": len(tree.problems), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                          for k, v in config.__dict__.items()},
                "history": history, "epochs_run": len(history), "stopped_early": stopped_early,
                "nodes": len(tree.nodes), "spent": tree.budget.spent(),
                **({"hidden_states": len(hidden)} if hidden is not None else {}),
                "seconds": round(time.perf_counter() - t0, 1)}
    return nav, tree


def greedy_paths(nav: Navigator, tree: BlockTree) -> list[tuple[str, ...]]:
    """The navigator's most likely path on each of ``tree``'s problems (expanding what it visits)."""

    def best(path, obs):
        with torch.no_grad():
            return BLOCKS[int(nav.distribution(nav.vector(obs), nav.mask(State(path=path))).argmax())]

    return [tree.rollout(i, best)[0] for i in range(len(tree.problems))]
