"""Generative judges at test time: principles and a critique before the score, sampled and voted, filtered by a
meta reward model; pairwise verdicts checked for consistency under swapped order.

After DeepSeek's generalist reward modelling (SPCT / DeepSeek-GRM, 2025) and J1 (2025):

* ``genjudge`` (pointwise): the judge model is asked to write *principles* a good answer must meet, a *critique*
  of the answer against them, and then ``Score: N`` (1-10). ``votes`` samples are drawn and voted (``aggregate``:
  ``mean`` of the scores, DeepSeek-GRM's voting by summed scores, or ``majority``, the most common score, ties to
  the lower). The score is the vote / 10.
* **Meta filter**: with ``meta_probe=PATH`` (a probe file written by ``MetaProbe.save``) each judge sample is read
  back through the judge model (``backend.embed`` of the judge prompt and its sample: mean-pooled hidden states
  of the probe's layer, charged as verifier passes/tokens) and a logistic probe gives P(this judgement is right);
  only the top ``meta_keep`` share of the parsed samples (at least one) is voted -- the meta-RM-guided voting of
  DeepSeek-GRM, with a hidden-state probe as this project's meta reward model. ``train_meta_probe`` fits one
  (scikit-learn's logistic regression) from judge samples labelled right or wrong.
* ``pairwise_consistent``: the ``pairwise`` judge (both orders of every pair) that counts a pair as decided only
  when the two orders agree; a pair whose verdict flips with the order is a tie (0.5), J1's position-consistency
  rule, so position bias cannot pick a winner. With ``critique=true`` each judge sample first critiques both
  answers and ends with ``Verdict: A`` or ``Verdict: B`` (``sample`` mode; ``verdict_tokens`` long). The share
  of consistent pairs is reported in ``last_info["consistency"]`` and in each candidate's ``meta``.

Costs: the backend charges the judge's prompt and generated tokens (and the probe's embedding passes) to the
budget; these verifiers charge one ``judge_calls`` per judge sample, bought before sampling, so a judge-call limit
is a hard cap. **Fallback** for a judge sample without a parsable ``Score:`` (the model never wrote one within
``max_tokens``): ``fallback="drop"`` (default) drops it from the vote; ``fallback="logprob"`` has the judge read
its judgement back and takes the expected score under its next-token probabilities of the digits 1-9 (mapped onto
1-10; one verifier pass per such sample, charged) -- what lets a small model that ignores the format still judge.
A candidate with no scored sample, or none affordable, scores NaN -- the search marks it failed and goes on, as
for every verifier. Generation always stops at ``max_tokens``, so a
judge that never emits a score cannot hang a search.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import SteerscaleError
from ..backend import SamplingParams, derive_seed
from .base import finite
from .model_based import LLMJudge, PairwiseJudge

if TYPE_CHECKING:
    import torch

GENJUDGE_TEMPLATE = ("Grade the answer to the question.\n\nQuestion: {question}\n\nAnswer: {solution}\n\n"
                     "Reply in exactly this format, one short line each:\n"
                     "Principles: <what a correct, helpful answer to this question must do>\n"
                     "Critique: <how the answer meets or misses them>\n"
                     "Score: <a number from 1 (wrong) to 10 (fully correct)>")
CRITIQUE_PAIRWISE_TEMPLATE = ("Which answer to the question is better: more correct, then more helpful?\n\n"
                              "Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
                              "Briefly critique each answer, then finish with a line 'Verdict: A' or 'Verdict: B'.")
AGGREGATES = ("mean", "majority")
FALLBACKS = ("drop", "logprob")  # what happens to a judge sample without a parsable "Score: N"
PROBE_KIND = "steerscale.judge_meta_probe"

_SCORE = re.compile(r"score\s*(?:[:=]|is)?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\b|out of 10\b)?", re.IGNORECASE)
_VERDICT = re.compile(r"verdict\s*[:=]?\s*\**\s*(?:answer\s+)?([AB])(?![A-Za-z])", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """The judge's score: the number after the *last* ``Score:`` (``Score: 7``, ``score = 7/10``, ``Score is 7
    out of 10``), if it lies in 1..10; else None (the sample is dropped from the vote)."""
    found = _SCORE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def vote_scores(scores, aggregate: str = "mean") -> float:
    """The voted 1-10 score of parsed judge samples (NaN for none): their mean, or the most common one."""
    scores = [float(s) for s in scores]
    if not scores:
        return math.nan
    if aggregate == "mean":
        return sum(scores) / len(scores)
    counts = Counter(scores)
    top = max(counts.values())
    return min(s for s, c in counts.items() if c == top)


def meta_filter(scores, meta, keep: float) -> list[float]:
    """The scores whose meta-probe probabilities ``meta`` are in the top ``keep`` share (at least one; ties and
    NaN probabilities to the earlier sample). Without probabilities (``meta`` empty) every score is kept."""
    scores = list(scores)
    if not meta:
        return scores
    order = sorted(range(len(scores)), key=lambda i: (-meta[i] if math.isfinite(meta[i]) else math.inf, i))
    return [scores[i] for i in sorted(order[:max(1, math.ceil(keep * len(scores)))])]


# -- the meta reward model: a logistic probe on the judge's hidden states -----------------------------------------
@dataclass
class MetaProbe:
    """``P(judgement right) = sigmoid(features @ weight + bias)`` on the judge's mean-pooled hidden states at
    ``layer`` (features standardised by ``mean`` / ``scale``). Saved as safetensors with a JSON header."""

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    scale: torch.Tensor
    layer: int = -1
    info: dict | None = None

    def predict(self, features) -> list[float]:
        import torch

        x = torch.as_tensor(features, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise SteerscaleError(f"meta probe expects {self.weight.shape[0]}-dim features, got shape "
                                  f"{tuple(x.shape)}", "use the judge model the probe was trained on")
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias
        return torch.sigmoid(z).tolist()

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": PROBE_KIND, "layer": str(self.layer), "bias": repr(float(self.bias)),
                "info": json.dumps(self.info or {})}
        save_file({"weight": self.weight.contiguous(), "mean": self.mean.contiguous(),
                   "scale": self.scale.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path) -> "MetaProbe":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SteerscaleError(f"meta probe file {str(path)!r} not found",
                                  "train one with steerscale.scale.verifiers.judges.train_meta_probe(...).save(path)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise SteerscaleError(f"cannot read meta probe {str(path)!r} ({type(exc).__name__}: {exc})",
                                  "it must be a safetensors file written by MetaProbe.save") from None
        if meta.get("kind") != PROBE_KIND or not {"weight", "mean", "scale"} <= set(tensors):
            raise SteerscaleError(f"{str(path)!r} is not a judge meta probe",
                                  "it must be a safetensors file written by MetaProbe.save")
        return cls(tensors["weight"].float(), float(meta["bias"]), tensors["mean"].float(), tensors["scale"].float(),
                   int(meta.get("layer", -1)), json.loads(meta.get("info", "{}")))


def train_meta_probe(features, labels, layer: int = -1, c: float = 1.0, seed: int = 0) -> MetaProbe:
    """Fit the meta reward model: an L2 logistic regression (scikit-learn) from judge-sample features
    (``judge_sample_features``) to labels (1: the judgement was right, 0: wrong). Needs both labels present."""
    import numpy as np
    import torch

    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SteerscaleError("training a meta probe needs scikit-learn", "pip install 'scikit-learn>=1.4' (in "
                              "steerscale's dev extra); scoring with a saved probe does not need it") from None

    x = np.asarray(torch.as_tensor(features, dtype=torch.float32))
    y = np.asarray(labels, dtype=int)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise SteerscaleError(f"meta probe needs one feature row per label (got {x.shape} features, {len(y)} labels)")
    if len(set(y.tolist())) < 2:
        raise SteerscaleError("meta probe needs both right (1) and wrong (0) judgements to learn from",
                              "collect more judge samples, on answers the judge gets right and wrong")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    fit = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / scale, y)
    return MetaProbe(torch.tensor(fit.coef_[0], dtype=torch.float32), float(fit.intercept_[0]),
                     torch.tensor(mean, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32), layer,
                     {"n": int(len(y)), "positive": int(y.sum()), "C": c})


def judge_sample_features(backend, prompt: str, samples, budget, layer: int = -1):
    """``(len(samples), d)``: the judge model's mean-pooled hidden states (``layer``) over the chat-formatted judge
    prompt followed by each sample's text (``backend.embed``, charged as verifier work)."""
    fmt = getattr(backend, "format", None)
    head = fmt(prompt) if callable(fmt) else prompt
    return backend.embed([head + s for s in samples], budget, layer=layer)


class GenerativeJudge(LLMJudge):
    """Pointwise generative judge: principles, critique, ``Score: N``; ``votes`` samples voted, optionally
    meta-filtered by a hidden-state probe. See the module docstring."""

    name = "genjudge"

    def __init__(self, reference=None, backend=None, votes: int = 4, temperature: float = 0.7, seed: int = 0,
                 template: str = GENJUDGE_TEMPLATE, max_tokens: int = 160, aggregate: str = "mean",
                 meta_probe=None, meta_keep: float = 0.5, max_chars: int = 2000, fallback: str = "drop"):
        super().__init__(reference, backend, votes=votes, temperature=temperature, seed=seed, template=template)
        if aggregate not in AGGREGATES:
            raise SteerscaleError(f"unknown genjudge aggregate {aggregate!r}", f"use one of: {', '.join(AGGREGATES)}")
        for key, value in (("votes", votes), ("max_tokens", max_tokens), ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SteerscaleError(f"genjudge {key} must be an integer >= 1, got {value!r}")
        for field in ("{question}", "{solution}"):
            if field not in template:
                raise SteerscaleError(f"genjudge template lacks {field}", "it needs {question} and {solution}")
        try:
            template.format(question="", solution="")
        except (KeyError, IndexError, ValueError) as exc:
            raise SteerscaleError(f"bad genjudge template ({type(exc).__name__}: {exc})",
                                  "use only the fields {question} and {solution}; write other braces as {{ }}"
                                  ) from None
        if fallback not in FALLBACKS:
            raise SteerscaleError(f"unknown genjudge fallback {fallback!r}", f"use one of: {', '.join(FALLBACKS)}")
        self.fallback = fallback
        self.temperature = finite("genjudge temperature", temperature, 0.0)
        self.max_tokens, self.aggregate, self.max_chars = max_tokens, aggregate, max_chars
        self.meta_keep = finite("genjudge meta_keep", meta_keep, 1e-9, 1.0)
        self.probe = meta_probe if isinstance(meta_probe, MetaProbe) or meta_probe is None else MetaProbe.load(
            meta_probe)

    def sample_judgements(self, question: str, candidate, budget) -> tuple[str, list[tuple[str, float | None]]]:
        """The judge prompt for ``candidate`` and its judge samples as ``(text, parsed score or None)``: as many
        samples as the judge-call budget grants, up to ``votes``."""
        text = candidate.text.strip() or "(empty)"
        text = text if len(text) <= self.max_chars else "..." + text[-self.max_chars:]
        prompt = self.template.format(question=question, solution=text)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature if self.votes > 1 else 0.0,
                                step=None)
        n = budget.buy_judge(self.votes)  # the judge calls left; none: the candidate stays unscored
        seed = derive_seed(self.seed, question, text)  # a stream per candidate: votes on different answers
        outs = self.backend.sample(prompt, n, params, budget, seed=seed) if n else []
        samples = [(o.text, parse_score(o.text)) for o in outs]
        missing = [i for i, (_, sc) in enumerate(samples) if sc is None]
        if self.fallback == "logprob" and missing:
            for i, sc in zip(missing, self.read_scores(prompt, [samples[i][0] for i in missing], budget)):
                samples[i] = (samples[i][0], sc if math.isfinite(sc) else None)
        return prompt, samples

    def read_scores(self, prompt: str, texts, budget) -> list[float]:
        """The ``logprob`` fallback: the judge reads its own judgement back and is asked for the score; the
        expected digit under its next-token probabilities of ``1``..``9`` (one verifier pass per text, charged),
        mapped onto 1..10. NaN where the budget pays for no pass."""
        contexts = [prompt + "\n\nA grader's judgement of this answer:\n" + t.strip() + "\n\nSo, on a scale of 1 to 9, "
                    "the answer's score is" for t in texts]
        out = []
        for row in self.backend.choice_logprobs(contexts, [str(d) for d in range(1, 10)], budget):
            finite_lp = [x for x in row if math.isfinite(x)]
            if not finite_lp:
                out.append(math.nan)
                continue
            top = max(finite_lp)
            w = [math.exp(x - top) if math.isfinite(x) else 0.0 for x in row]
            digit = sum((d + 1) * wi for d, wi in enumerate(w)) / sum(w)
            out.append(1.0 + (digit - 1.0) * 9.0 / 8.0)
        return out

    def judge(self, question: str, candidate, budget) -> dict:
        """Sample, parse, meta-filter and vote for one candidate: ``{"score", "samples", "parsed", "kept",
        "scores", "meta"}`` (``score``: the voted 1-10 score, NaN when no sample parsed)."""
        prompt, samples = self.sample_judgements(question, candidate, budget)
        parsed = [(t, s) for t, s in samples if s is not None]
        meta = []
        if self.probe is not None and len(parsed) > 1:
            feats = judge_sample_features(self.backend, prompt, [t for t, _ in parsed], budget, self.probe.layer)
            meta = self.probe.predict(feats)
        kept = meta_filter([s for _, s in parsed], meta, self.meta_keep)
        return {"score": vote_scores(kept, self.aggregate), "samples": len(samples), "parsed": len(parsed),
                "kept": len(kept), "scores": [s for _, s in parsed], "meta": [round(m, 4) for m in meta]}

    def score(self, question, candidate, budget, partial=False):
        verdict = self.judge(question, candidate, budget)
        candidate.meta["judge"] = {k: v for k, v in verdict.items() if k != "score"}
        return verdict["score"] / 10.0


class ConsistentPairwise(PairwiseJudge):
    """``pairwise`` with J1's swapped-order consistency: a pair counts as a win only when both orders agree
    (a tie, 0.5, otherwise); ``critique=true`` makes each judge sample critique both answers before its verdict."""

    name = "pairwise_consistent"

    def __init__(self, reference=None, backend=None, mode: str = "logprob", votes: int = 3, temperature: float = 0.7,
                 seed: int = 0, round_robin_max: int = 8, batch: int = 16, max_chars: int = 2000, template=None,
                 critique: bool = False, verdict_tokens: int = 160):
        if not isinstance(critique, bool):
            raise SteerscaleError(f"pairwise_consistent critique must be true or false, got {critique!r}")
        if critique and mode != "sample":
            if mode != "logprob":  # the default; anything else is a real conflict
                raise SteerscaleError("critique=true needs mode=sample", "drop mode= or set mode=sample")
            mode = "sample"  # a critique is written, so it is sampled
        if template is None:
            from .model_based import PAIRWISE_TEMPLATE

            template = CRITIQUE_PAIRWISE_TEMPLATE if critique else PAIRWISE_TEMPLATE
        super().__init__(reference, backend, mode=mode, votes=votes, temperature=temperature, seed=seed,
                         round_robin_max=round_robin_max, batch=batch, max_chars=max_chars, template=template)
        if isinstance(verdict_tokens, bool) or not isinstance(verdict_tokens, int) or verdict_tokens < 1:
            raise SteerscaleError(f"pairwise_consistent verdict_tokens must be an integer >= 1, got {verdict_tokens!r}")
        self.critique = critique
        self.verdict_tokens = verdict_tokens if critique else PairwiseJudge.verdict_tokens
        self._decided = self._consistent = 0

    def parse_pick(self, text):
        if not self.critique:
            return super().parse_pick(text)
        found = _VERDICT.findall(text)  # the last verdict counts; a critique mentioning "A" is no verdict
        return found[-1].upper() if found else None

    def pair_probability(self, first, second):
        if not (math.isfinite(first) and math.isfinite(second)):
            return super().pair_probability(first, second)  # one order undecided: nothing to check it against
        self._decided += 1
        if (first - 0.5) * (second - 0.5) > 0:  # both orders prefer the same answer
            self._consistent += 1
            return (first + second) / 2.0
        return 0.5  # the verdict flips with the order (or an order is a dead heat): a tie

    def score_batch(self, question, candidates, budget, partial=False):
        self._decided = self._consistent = 0
        out = super().score_batch(question, candidates, budget, partial)
        rate = self._consistent / self._decided if self._decided else math.nan
        self.last_info["consistency"] = rate
        for c in candidates:
            c.meta["pair_consistency"] = round(rate, 4) if math.isfinite(rate) else None
        return out
