"""Model-based scorers: self-evaluation P(Yes), LLM-as-judge (pointwise and pairwise), log-prob confidence."""

from __future__ import annotations

import math
import re

from ...errors import SteerscaleError
from ..backend import Backend, SamplingParams
from .base import Verifier, finite, parse_options, require_candidates

SELF_EVAL_TEMPLATE = ("Question: {question}\nProposed solution: {solution}\n\n"
                      "Is the proposed solution correct? Answer Yes or No.")
PAIRWISE_TEMPLATE = ("Which answer to the question is better: more correct, then more helpful?\n\n"
                     "Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\nReply with only the letter A or B.")
JUDGE_TEMPLATE = ("Rate how correct and helpful this answer is on a scale from 1 to 10.\n\nQuestion: {question}\n"
                  "Answer: {solution}\n\nReply with only the number (1-10).")


class _ModelVerifier(Verifier):
    def __init__(self, reference=None, backend: Backend | None = None):
        super().__init__(reference)
        if backend is None:
            raise SteerscaleError(f"verifier {self.name!r} needs a model backend",
                                  "pass backend=... (the generator's own LocalBackend works)")
        self.backend = backend


class SelfEval(_ModelVerifier):
    """``P(Yes) / (P(Yes) + P(No))`` when the model is asked whether the (partial) solution is correct.
    One batched forward pass for all candidates, charged to the budget as verifier passes and tokens."""

    name = "self_eval"
    process = True

    def __init__(self, reference=None, backend=None, template: str = SELF_EVAL_TEMPLATE):
        super().__init__(reference, backend)
        self.template = template

    def score_batch(self, question, candidates, budget, partial=False):
        contexts = [self.template.format(question=question, solution=c.text.strip() or "(empty)") for c in candidates]
        lp = self.backend.choice_logprobs(contexts, ["Yes", "No"], budget)
        return [1.0 / (1.0 + math.exp(n - y)) for y, n in lp]


class LLMJudge(_ModelVerifier):
    """Pointwise LLM-as-judge: ``votes`` judge samples, each parsed for a 1-10 rating; the mean / 10.
    Unparseable samples are dropped; when none parses the candidate fails (NaN)."""

    name = "judge"

    def __init__(self, reference=None, backend=None, votes: int = 3, temperature: float = 0.7, seed: int = 0,
                 template: str = JUDGE_TEMPLATE):
        super().__init__(reference, backend)
        if votes < 1:
            raise SteerscaleError(f"judge votes must be >= 1, got {votes}")
        self.votes, self.temperature, self.seed, self.template = votes, temperature, seed, template

    def score(self, question, candidate, budget, partial=False):
        prompt = self.template.format(question=question, solution=candidate.text.strip() or "(empty)")
        params = SamplingParams(max_tokens=8, temperature=self.temperature if self.votes > 1 else 0.0, step=None)
        votes = budget.buy_judge(self.votes)  # the judge calls left; none: the candidate stays unscored
        outs = self.backend.sample(prompt, votes, params, budget, seed=self.seed) if votes else []
        ratings = []
        for o in outs:
            m = re.search(r"\b(10|[1-9])\b", o.text)
            if m:
                ratings.append(int(m.group(1)))
        return sum(ratings) / (10.0 * len(ratings)) if ratings else float("nan")


class PairwiseJudge(_ModelVerifier):
    """Pairwise LLM-as-judge (generative reward model style): the judge is asked which of two answers is better,
    in both orders (A/B and B/A) so position bias cancels, and each candidate scores its mean win rate.

    * ``mode="logprob"`` (default): ``P(A) / (P(A) + P(B))`` from the judge's first-token log-probs via
      ``backend.choice_logprobs`` -- one batched forward pass per ``batch`` prompts, deterministic.
      ``mode="sample"``: ``votes`` judge samples per prompt (``backend.sample``), each parsed for a lone
      ``A``/``B``; the win probability is the share of votes (unparseable samples are dropped). Works on any
      backend that can sample, e.g. an HTTP one without log-probs.
    * Pairing: identical answer texts are merged (they tie, so they are not judged). Up to ``round_robin_max``
      distinct answers (default 8: 28 pairs, 56 judge prompts) play a full round robin; above that, every answer
      is judged against one pivot -- the answer the generator was most confident in (highest mean token
      log-prob) -- so the cost is ``2 (k - 1)`` prompts for ``k`` distinct answers. A non-pivot's score is its
      win rate against the pivot; the pivot's is its mean win rate over all its games.
    * A lone distinct answer scores 0.5 (nothing to compare). In ``sample`` mode a candidate none of whose
      games produced a parseable vote scores NaN (the search marks it failed).
    * Costs, as for ``judge``: the backend charges the judge's tokens and FLOPs (prompt/generated tokens when
      sampling, verifier passes/tokens for log-probs); this verifier charges one ``judge_calls`` per judge
      sample (``sample``) or per judged prompt (``logprob``).
    * Answers longer than ``max_chars`` characters are cut to their last ``max_chars`` (where the final answer is).
    """

    name = "pairwise"
    MODES = ("logprob", "sample")
    verdict_tokens = 4  # tokens a judge sample may write (``sample`` mode)

    def __init__(self, reference=None, backend=None, mode: str = "logprob", votes: int = 3, temperature: float = 0.7,
                 seed: int = 0, round_robin_max: int = 8, batch: int = 16, max_chars: int = 2000,
                 template: str = PAIRWISE_TEMPLATE):
        super().__init__(reference, backend)
        if mode not in self.MODES:
            raise SteerscaleError(f"unknown pairwise mode {mode!r}", f"use one of: {', '.join(self.MODES)}")
        for key, value, low in (("votes", votes, 1), ("round_robin_max", round_robin_max, 2), ("batch", batch, 1),
                                ("max_chars", max_chars, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SteerscaleError(f"pairwise {key} must be an integer >= {low}, got {value!r}")
        for field in ("{question}", "{a}", "{b}"):
            if field not in template:
                raise SteerscaleError(f"pairwise template lacks {field}", "it needs {question}, {a} and {b}")
        try:
            template.format(question="", a="", b="")
        except (KeyError, IndexError, ValueError) as exc:
            raise SteerscaleError(f"bad pairwise template ({type(exc).__name__}: {exc})",
                                  "use only the fields {question}, {a} and {b}; write other braces as {{ }}") from None
        self.mode, self.votes, self.seed, self.template = mode, votes, int(seed), template
        self.temperature = finite("pairwise temperature", temperature, 0.0)
        self.round_robin_max, self.batch, self.max_chars = round_robin_max, batch, max_chars

    def _text(self, c) -> str:
        t = c.text.strip() or "(empty)"
        return t if len(t) <= self.max_chars else "..." + t[-self.max_chars:]

    def pairs(self, candidates) -> tuple[list[list[int]], list[tuple[int, int]], int | None]:
        """``(groups, pairs, pivot)``: candidate indices per distinct text, the pairs of groups to judge, and the
        pivot group (None for a round robin)."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(candidates):
            groups.setdefault(self._text(c), []).append(i)
        members = list(groups.values())
        k = len(members)
        if k <= self.round_robin_max:
            return members, [(a, b) for a in range(k) for b in range(a + 1, k)], None
        conf = [max(candidates[i].mean_logprob if candidates[i].logprobs else -math.inf for i in m) for m in members]
        pivot = max(range(k), key=lambda g: (conf[g], -g))
        return members, [(g, pivot) for g in range(k) if g != pivot], pivot

    def _win_logprob(self, prompts: list[str], budget) -> list[float]:
        """P(the answer shown as A wins) for each prompt, from first-token log-probs."""
        out = []
        for start in range(0, len(prompts), self.batch):
            chunk = prompts[start:start + self.batch]
            paid = budget.buy_judge(len(chunk))  # prompts past the judge calls left stay undecided (NaN)
            lp = self.backend.choice_logprobs(chunk[:paid], ["A", "B"], budget) if paid else []
            lp += [(math.nan, math.nan)] * (len(chunk) - paid)
            for la, lb in lp:
                out.append(0.5 * (1.0 + math.tanh((la - lb) / 2.0)) if not (la == lb == -math.inf) else math.nan)
        return out

    def _win_sample(self, prompts: list[str], budget) -> list[float]:
        """Share of parseable judge samples that pick A (NaN when none parses)."""
        params = SamplingParams(max_tokens=self.verdict_tokens, temperature=self.temperature if self.votes > 1 else 0.0,
                                step=None)
        out = []
        for p in prompts:
            votes = budget.buy_judge(self.votes)
            outs = self.backend.sample(p, votes, params, budget, seed=self.seed) if votes else []
            picks = [x for x in (self.parse_pick(o.text) for o in outs) if x]
            out.append(picks.count("A") / len(picks) if picks else math.nan)
        return out

    @staticmethod
    def pair_probability(first: float, second: float) -> float:
        """P(a beats b) from the two orders (a shown first, a shown second): their mean, or the one that was
        decided (NaN when neither was). ``pairwise_consistent`` overrides it."""
        seen = [x for x in (first, second) if math.isfinite(x)]
        return sum(seen) / len(seen) if seen else math.nan

    def parse_pick(self, text: str) -> str | None:
        """The answer letter a judge sample picks: a lone ``A`` or ``B`` (None when there is none)."""
        m = re.search(r"(?<![A-Za-z])([AB])(?![A-Za-z])", text)
        return m.group(1) if m else None

    def score_batch(self, question, candidates, budget, partial=False):
        cands = require_candidates(self.name, candidates)
        members, pairs, pivot = self.pairs(cands)
        texts = [self._text(cands[m[0]]) for m in members]
        prompts = []
        for a, b in pairs:  # both orders: a shown first, then b shown first
            prompts.append(self.template.format(question=question, a=texts[a], b=texts[b]))
            prompts.append(self.template.format(question=question, a=texts[b], b=texts[a]))
        win = (self._win_logprob if self.mode == "logprob" else self._win_sample)(prompts, budget) if prompts else []
        games: list[list[float]] = [[] for _ in members]
        for k, (a, b) in enumerate(pairs):
            p = self.pair_probability(win[2 * k], 1.0 - win[2 * k + 1])  # P(a beats b) in each order
            if not math.isfinite(p):
                continue
            games[a].append(p)
            games[b].append(1.0 - p)
        group_score = [sum(g) / len(g) if g else (0.5 if len(members) == 1 else math.nan) for g in games]
        self.last_info = {"distinct": len(members), "judged_pairs": len(pairs), "pivot": pivot,
                          "prompts": len(prompts)}
        out = [math.nan] * len(cands)
        for g, m in enumerate(members):
            for i in m:
                out[i] = group_score[g]
        return out


class LogprobConfidence(Verifier):
    """The generator's own confidence: ``exp(mean token log-prob)`` of the candidate (no extra compute)."""

    name = "logprob"
    process = True

    def score(self, question, candidate, budget, partial=False):
        if not candidate.logprobs:
            return 0.0
        return math.exp(candidate.mean_logprob)


class DiversityBonus(Verifier):
    """Representation-diversity bonus for exploration: ``base score + weight * (1 - max cosine similarity to the
    other candidates)``, clipped to ``[0, 1]``. Similarity is between the candidates' mean-pooled hidden states
    (``backend.embed``, one batched forward pass of the candidate texts, charged as verifier work), so a
    particle/beam that says something new gets a boost and near-copies get none (identical texts: bonus 0).

    ``base`` is any other registered verifier name (default ``logprob``), built with the same ``reference`` and
    ``backend`` plus ``base_options`` (a dict or ``"key=value,..."``); ``weight`` is the lambda (>= 0);
    ``layer`` picks the hidden states (-1: last layer). A lone candidate gets no bonus. A candidate the base
    verifier fails on stays failed. The base's process flag and step scores carry over."""

    name = "diverse"

    def __init__(self, reference=None, backend=None, base: str = "logprob", weight: float = 0.1, layer: int = -1,
                 base_options=None):
        from .registry import get_verifier

        super().__init__(reference)
        if backend is None:
            raise SteerscaleError("verifier 'diverse' needs a model backend to embed the candidates",
                                  "pass backend=... (the generator's own LocalBackend works)")
        if type(backend).embed is Backend.embed:
            raise SteerscaleError(f"verifier 'diverse' needs a backend that can embed; {type(backend).__name__} "
                                  "cannot", "use a LocalBackend")
        if base == self.name or isinstance(base, DiversityBonus):
            raise SteerscaleError("verifier 'diverse' cannot wrap itself", "pick another base, e.g. base=arith_prm")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise SteerscaleError(f"diverse layer must be an integer, got {layer!r}")
        self.backend, self.layer = backend, layer
        self.weight = finite("diverse weight", weight, 0.0)
        self.base = get_verifier(base, reference=reference, backend=backend, **parse_options(base_options,
                                                                                             "diverse base_options"))
        if self.base is None:
            raise SteerscaleError("verifier 'diverse' needs a base verifier", "e.g. base=logprob")
        self.process = self.base.process
        self.needs_reference = self.base.needs_reference

    def with_reference(self, reference):
        new = super().with_reference(reference)
        new.base = self.base.with_reference(reference)
        return new

    def bonuses(self, candidates, budget) -> list[float]:
        """``1 - max cosine similarity`` of each candidate's embedding to the others' (0 for a lone one)."""
        import torch

        if len(candidates) < 2:
            return [0.0] * len(candidates)
        emb = self.backend.embed([c.text.strip() or "(empty)" for c in candidates], budget, layer=self.layer)
        emb = torch.as_tensor(emb, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(candidates) or not bool(torch.isfinite(emb).all()):
            raise SteerscaleError(f"backend.embed returned a bad tensor (shape {tuple(emb.shape)}) for "
                                  f"{len(candidates)} texts", "embed must give one finite vector per text")
        unit = torch.nn.functional.normalize(emb, dim=-1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-math.inf)
        return (1.0 - sim.max(dim=-1).values.clamp(-1.0, 1.0)).tolist()

    def score_batch(self, question, candidates, budget, partial=False):
        cands = require_candidates(self.name, candidates)
        base = self.base.score_batch(question, cands, budget, partial=partial)
        if len(base) != len(cands):
            raise SteerscaleError(f"base verifier {self.base.name!r} returned {len(base)} scores for "
                                  f"{len(cands)} candidates")
        bonus = self.bonuses(cands, budget) if self.weight > 0 else [0.0] * len(cands)
        out = []
        for c, s, b in zip(cands, base, bonus):
            c.meta["diversity"] = round(b, 6)
            if isinstance(s, BaseException) or s is None or not math.isfinite(float(s)):
                out.append(s)  # the base failed on it: keep the failure
            else:
                out.append(min(1.0, max(0.0, float(s) + self.weight * b)))
        return out
