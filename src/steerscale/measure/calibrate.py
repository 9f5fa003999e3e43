"""``steerscale calibrate``: which layer and strength to steer at, decided by measured effect against measured cost.

The steps, all on data the chosen setting is later judged on only once:

1. Split the contrastive pairs (seeded) into *train* (fits one CAA direction per candidate layer, in one capture
   pass), *select* (picks the setting) and *test* (reports the chosen setting, the fixed settings to compare with
   and the prompting baseline). A ``vector`` given instead of pairs to fit is used as it is (its own sites), and
   the pairs are split into select and test only.
2. Coarse sweep: each candidate layer (``auto``: five layers spread over the middle of the network) at ascending
   strengths; a layer stops at the first strength whose KL on neutral text passes ``break_kl`` (the text breaks,
   stronger will not help). Fine sweep: around the best setting within the budget, the geometric midpoints to its
   neighbouring strengths and the layers halfway to its neighbouring candidates.
3. Each setting is measured as the demo measures steering: the effect is the gain of the per-pair log-prob margin
   (positive minus negative reply, nats/token) over the unsteered model on the same pairs, with a paired
   bootstrap interval (``measure.stats.paired_compare``); the cost is KL(base || steered) and the perplexity
   ratio on neutral texts (``measure.cost.steering_cost``).
4. The recommendation: the largest effect gain among the settings whose gain interval excludes zero and whose
   KL upper bound is within ``max_kl``. No such setting: no recommendation, and the reason (no effect, or every
   effect costs more than the budget) -- a vector without an effect is never given a strength.
5. On the test split: the recommended setting, the ``compare`` settings, the prompting baseline (a system prompt
   such as "Be formal.") and prompt + the recommendation, each as a gain over unsteered with an interval, and
   steering against prompting paired on the same pairs; greedy samples with their repetition rate (coherence).

Measurements are appended to ``measurements.jsonl`` in the output folder as they finish, keyed by everything that
decides them, so an interrupted run resumes where it stopped. Outputs: ``calibration.json``, ``calibration.png``
(effect against KL per layer, the Pareto front, the budget and the prompting baseline) and, when there is a
recommendation, ``calibrated.safetensors``: the chosen direction already multiplied by the chosen strength, so
``--steer calibrated.safetensors``, ``steerscale bake`` and ``steerscale serve --vector`` take it at scale 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..engine.capture import tokenize
from ..engine.generation import generate
from ..engine.runtime import intervene
from ..errors import SteerscaleError
from ..steer.extract import extract
from ..steer.layers import parse_layers
from ..steer.pairs import ContrastPair, as_pairs
from ..steer.vector import SteeringVector, fingerprint, register_reader
from .cost import _exp, _logprobs, neutral_prompts
from .judges import Judge, parse_judge
from .mc import score_choices
from .stats import bootstrap_ci, paired_compare

DEFAULT_SCALES = (0.5, 1.0, 2.0, 4.0)  # multiples of the method's own strength (CAA: the mean difference)
DEFAULT_EXPAND = 2  # layers swept over every strength after the layer scan (0: every candidate layer)
LAYER_FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8)  # where `auto` looks: steering works mid-network, rarely at the ends
# The instruction a bundled pair set is read against (the demo's prompting baseline for formality).
PROMPT_BASELINES = {"formal_casual": "Be formal."}
SAMPLE_PROMPTS = ("How was your weekend?", "Can you explain what a black hole is?", "Any advice for a first job?")


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a layer (None: all of a given vector's own sites) and a strength."""

    layer: int | None
    scale: float

    def label(self) -> str:
        return f"{'vector' if self.layer is None else f'L{self.layer}'} x{self.scale:g}"


@dataclass
class Calibration:
    """What ``calibrate`` found: every measured row, the front, the recommendation (or why there is none) and the
    test-split comparison."""

    model: str
    rows: list[dict]
    front: list[dict]
    recommended: dict | None
    verdict: str
    test: dict
    config: dict
    seconds: float
    vector_path: str | None = None
    plot_path: str | None = None
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "recommended": self.recommended, "verdict": self.verdict,
                "steer": f"{self.vector_path}:1" if self.vector_path else None,
                "vector_file": Path(self.vector_path).name if self.vector_path else None, "front": self.front,
                "rows": self.rows, "test": self.test, "samples": self.samples, "seconds": round(self.seconds, 1),
                "plot": self.plot_path}


# -- the pieces ---------------------------------------------------------------------------------------------------
def split_pairs(pairs: list[ContrastPair], fit: bool, seed: int) -> tuple[list, list, list]:
    """(train, select, test), seeded. With ``fit`` a half trains and a quarter each selects and tests; without,
    (a given vector) half selects and half tests."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(2, round(len(pairs) / 4)) if fit else len(pairs) // 2
    need = 2 * n_eval + (2 if fit else 0)
    if len(pairs) < max(need, 4):
        raise SteerscaleError(f"calibration needs at least {max(need, 4)} pairs here, got {len(pairs)}",
                              "give more contrastive pairs (the bundled formal_casual set has 40)")
    pick = [pairs[i] for i in order]
    select, test = pick[:n_eval], pick[n_eval:2 * n_eval]
    train = pick[2 * n_eval:] if fit else []
    return train, select, test


def auto_layers(n_layers: int) -> list[int]:
    """Candidate layers for ``layers=auto``: spread over the middle of the network."""
    return sorted({min(n_layers - 1, max(0, round((n_layers - 1) * f))) for f in LAYER_FRACTIONS})


def pair_margins(lm, pairs: Sequence[ContrastPair], interventions=(), system: str | None = None) -> list[float]:
    """Per pair: mean per-token log-prob of the positive reply minus the negative one (nats/token), under
    ``interventions`` and an optional system prompt. Full-text pairs (no prompt) are scored after an empty prompt."""
    scores = score_choices(lm.model, lm.tokenizer, [p.prompt or "" for p in pairs],
                           [[p.positive, p.negative] for p in pairs], interventions, layout=lm.layout, system=system)
    return [s["mean_logprobs"][0] - s["mean_logprobs"][1] for s in scores]


def repetition(token_ids: Sequence[int], n: int = 3) -> float:
    """Share of a text's token n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both effect (higher gain) and cost (lower KL), cheapest first (rows without a
    measured effect left out)."""
    rows = [r for r in rows if r["gain"] is not None]
    def beats(a, b):
        ge = a["gain"]["diff"] >= b["gain"]["diff"] and a["kl"]["mean"] <= b["kl"]["mean"]
        return ge and (a["gain"]["diff"] > b["gain"]["diff"] or a["kl"]["mean"] < b["kl"]["mean"])
    return sorted((r for r in rows if not any(beats(o, r) for o in rows if o is not r)), key=lambda r: r["kl"]["mean"])


def choose(rows: list[dict], max_kl: float, min_gain: float = 0.05) -> tuple[dict | None, str]:
    """The recommended row and a sentence saying why (or why none): the largest gain among rows whose gain
    interval is above zero, whose gain is at least ``min_gain`` (a deterministic model makes even a negligible
    change significant) and whose KL upper bound is within ``max_kl``. Broken rows (no effect measured) never
    qualify."""
    measured = [r for r in rows if r["gain"] is not None]
    effective = [r for r in measured if r["gain"]["lo"] > 0 and r["gain"]["diff"] >= min_gain]
    feasible = [r for r in effective if r["kl"]["hi"] <= max_kl and not r["broken"]]
    if feasible:
        best = max(feasible, key=lambda r: (r["gain"]["diff"], -r["kl"]["mean"]))
        return best, (f"{best['label']}: effect gain {best['gain']['diff']:+.3f} [{best['gain']['lo']:+.3f}, "
                      f"{best['gain']['hi']:+.3f}] at KL {best['kl']['mean']:.3f} (upper bound "
                      f"{best['kl']['hi']:.3f} <= --max-kl {max_kl:g})")
    if not effective:
        top = max(measured, key=lambda r: r["gain"]["diff"], default=None)
        seen = f" (largest gain {top['gain']['diff']:+.3g} at {top['label']})" if top else ""
        return None, (f"no setting has an effect: no gain interval is above zero with a gain of at least "
                      f"{min_gain:g}{seen}; the vector does not move this behaviour here at "
                      "any strength tried, so no strength is recommended")
    cheapest = min(effective, key=lambda r: r["kl"]["hi"])
    return None, (f"every setting with an effect costs more than --max-kl {max_kl:g}: the cheapest, "
                  f"{cheapest['label']}, has KL upper bound {cheapest['kl']['hi']:.3f}; raise --max-kl or accept "
                  "no steering")


class MeasurementCache:
    """``measurements.jsonl``: one line per finished measurement, keyed by everything that decides it."""

    def __init__(self, path: Path | None):
        self.path, self.rows = path, {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by an interrupt: measured again
                if isinstance(obj, dict) and "key" in obj:
                    self.rows[obj["key"]] = obj["value"]
        self.from_file, self.hits = set(self.rows), 0  # hits: measurements an earlier run had finished

    def get_or_measure(self, key: str, measure):
        if key in self.rows:
            if key in self.from_file:
                self.hits += 1
                self.from_file.discard(key)
            return self.rows[key]
        value = measure()
        self.rows[key] = value
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
        return value


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _vector_digest(v: SteeringVector) -> str:
    return _digest(*[s.key() for s in v.sites], *[d.numpy().tobytes() for d in v.directions.values()])


# -- the sweep ----------------------------------------------------------------------------------------------------
class CostMeter:
    """KL(base || steered) and the perplexity ratio on neutral texts, computed as ``measure.cost.steering_cost``
    computes them (same batches, same per-text means and intervals), with the unsteered pass run once per
    calibration rather than once per setting: half the cost passes of a sweep."""

    def __init__(self, lm, texts: Sequence[str], seed: int = 0, batch_size: int = 8):
        self.lm, self.seed = lm, seed
        device = next(lm.model.parameters()).device
        self.batches = [tokenize(lm.tokenizer, list(texts[s:s + batch_size]), device)
                        for s in range(0, len(texts), batch_size)]
        self.base = [_logprobs(lm.model, b) for b in self.batches]

    @torch.no_grad()
    def __call__(self, interventions) -> dict:
        kl_per_text, nll_base, nll_steer = [], [], []
        for batch, base in zip(self.batches, self.base):
            with intervene(self.lm.layout, list(interventions)):
                steer = _logprobs(self.lm.model, batch)
            mask = batch.attention_mask.bool()
            valid = mask[:, :-1] & mask[:, 1:]
            kl = (base.exp() * (base - steer)).sum(-1)[:, :-1]
            tgt = batch.input_ids[:, 1:, None]
            nb, ns = -base[:, :-1].gather(-1, tgt)[..., 0], -steer[:, :-1].gather(-1, tgt)[..., 0]
            for r in range(kl.shape[0]):
                v = valid[r]
                if v.any():
                    kl_per_text.append(float(kl[r][v].mean()))
                    nll_base.append(float(nb[r][v].mean()))
                    nll_steer.append(float(ns[r][v].mean()))
        if not kl_per_text:
            raise SteerscaleError("the neutral texts are all one token long", "use longer texts")
        mb, ms = sum(nll_base) / len(nll_base), sum(nll_steer) / len(nll_steer)
        return {"kl": bootstrap_ci(kl_per_text, seed=self.seed).to_dict(), "ppl_ratio": _exp(ms - mb),
                "n_texts": len(kl_per_text)}


class _Sweep:
    """Measures settings (cached) against the unsteered effect on one split. ``splits``: ``{"select": items,
    "test": items}``, contrastive pairs (effect: the margin) or prompts (effect: ``judge`` on greedy replies of
    ``judge_tokens`` tokens)."""

    def __init__(self, lm, vectors: dict, splits: dict, texts, seed, cache, meter: CostMeter,
                 judge: Judge | None = None, judge_tokens: int = 32):
        self.lm, self.vectors, self.splits, self.seed, self.cache = lm, vectors, splits, seed, cache
        self.meter, self.judge, self.judge_tokens = meter, judge, judge_tokens
        self.bar = None  # the progress bar, while a sweep runs
        self.context = _digest(lm.name, fingerprint(lm.layout), texts, seed,
                               judge.spec if judge else "margin", judge_tokens if judge else 0)
        self.base = self.effect(None, 0.0, "select")
        self.rows: dict[Setting, dict] = {}

    def effect(self, layer, scale, split: str, system=None) -> list[float]:
        """Per item of ``split``: the pair's margin, or the judge's score of the greedy reply to the prompt."""
        items = self.splits[split]
        ivs = self.vectors[layer].interventions(scale) if scale else []
        key = _digest("effect", self.context, _vector_digest(self.vectors[layer]) if scale else "-", scale,
                      [(p.prompt, p.positive, p.negative) if isinstance(p, ContrastPair) else p for p in items],
                      system)
        if self.judge is None:
            return self.cache.get_or_measure(key, lambda: pair_margins(self.lm, items, ivs, system))

        def judged():
            gens = generate(self.lm.model, self.lm.tokenizer, self.lm.layout, items, ivs,
                            max_new_tokens=self.judge_tokens, system=system)
            return self.judge.score(self.lm, items, [g.text for g in gens])
        return self.cache.get_or_measure(key, judged)

    def cost(self, layer, scale) -> dict:
        key = _digest("cost", self.context, _vector_digest(self.vectors[layer]), scale)
        return self.cache.get_or_measure(key, lambda: self.meter(self.vectors[layer].interventions(scale)))

    def measure(self, setting: Setting, stage: str, break_kl: float) -> dict:
        """One row: the cost first; the effect only where the text does not break (past ``break_kl`` the setting
        can never be chosen, so its effect pass is saved)."""
        if setting in self.rows:
            return self.rows[setting]
        if self.bar is not None:
            self.bar.set_postfix_str(setting.label())
        cost = self.cost(setting.layer, setting.scale)
        kl = cost["kl"]
        broken = not math.isfinite(kl["mean"]) or kl["mean"] > break_kl
        row = {"label": setting.label(), "layer": setting.layer, "scale": setting.scale, "stage": stage,
               "gain": None, "effect": None, "kl": kl, "ppl_ratio": cost["ppl_ratio"], "broken": broken}
        if not broken:
            m = self.effect(setting.layer, setting.scale, "select")
            row["gain"] = _gain(self.base, m, self.seed)
            row["effect"] = bootstrap_ci(m, seed=self.seed).to_dict()
        self.rows[setting] = row
        if self.bar is not None:
            self.bar.update(1)
        return row


def calibrate(lm, pairs, *, vector: SteeringVector | None = None, layers="auto",
              scales: Sequence[float] = DEFAULT_SCALES, max_kl: float = 0.5, break_kl: float | None = None,
              min_gain: float = 0.05, system: str | None = None, compare: Sequence[tuple[int, float]] = (),
              judge: str | Judge | None = None, prompts: Sequence[str] | None = None, judge_tokens: int = 32,
              expand: int = DEFAULT_EXPAND, n_neutral: int = 12, gen_tokens: int = 32, max_repetition: float = 0.5,
              read: str = "mean", seed: int = 0, out_dir: str | Path | None = None, progress: bool = True,
              log=print, _shared: dict | None = None) -> Calibration:
    """Sweep layers x strengths for ``pairs`` (or for ``vector``, measured on ``pairs``) and recommend a setting
    under ``max_kl`` (nats/token, KL upper bound on neutral text). See the module docstring for the steps.
    ``min_gain``: the smallest effect gain that counts as an effect (nats/token for the margin; the judge's unit
    with ``judge``). ``break_kl`` (default twice ``max_kl``): a layer's sweep stops at the first strength whose
    mean KL passes it. ``expand``: after every candidate layer is measured at the reference strength, the layers
    swept over every strength (the ``expand`` with the largest gain predicted at the budget; 0: all of them).

    ``judge`` (``measure.judges``: ``regex:PATTERN``, ``lexicon:FILE``, ``probe:FILE``, ``llm:QUESTION``): the
    effect is the judge's score of greedy replies (``judge_tokens`` tokens) instead of the pairs' margin, on
    ``prompts`` (split half select, half test) or on the pairs' own prompts. With a ``vector`` and ``prompts``
    no pairs are needed.

    ``system``: the prompting baseline's system prompt (None: none measured). ``compare``: ``(layer, scale)``
    settings reported beside the recommendation on the test split (e.g. a fixed setting used today).
    ``gen_tokens``: greedy tokens per sample prompt for the coherence check (0: none); a recommendation whose
    samples repeat more than ``max_repetition`` (share of repeated token 3-grams) is passed over for the next best."""
    started = time.perf_counter()
    scales = _check_scales(scales)
    break_kl = 2 * max_kl if break_kl is None and isinstance(max_kl, (int, float)) else break_kl
    for name, value in (("max_kl", max_kl), ("break_kl", break_kl)):
        if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise SteerscaleError(f"{name} must be a positive number of nats per token, got {value!r}",
                                  "e.g. --max-kl 0.5 (KL on neutral text; the demo's layer-14 x1 vector costs ~0.2)")
    if not isinstance(min_gain, (int, float)) or not 0 <= min_gain < math.inf:
        raise SteerscaleError(f"min_gain must be 0 or more, got {min_gain!r}", "e.g. --min-gain 0.05")
    if n_neutral < 2:
        raise SteerscaleError(f"n_neutral must be at least 2, got {n_neutral}")
    if not isinstance(expand, int) or expand < 0:
        raise SteerscaleError(f"expand must be 0 (every layer) or more, got {expand!r}", "e.g. --expand 2")
    judge = parse_judge(judge)
    if judge is not None:
        judge.check(lm)
        if judge_tokens < 1:
            raise SteerscaleError(f"a judge reads generated replies: judge_tokens must be at least 1, got "
                                  f"{judge_tokens}")
    train, select, test = _splits(pairs, vector, judge, prompts, seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    shared = _shared if _shared is not None else {}
    cache = shared.get("cache") or MeasurementCache(out / "measurements.jsonl" if out is not None else None)
    vectors, candidates = _directions(lm, vector, layers, compare, train, read, seed, progress, log)

    texts = neutral_prompts()[::max(1, len(neutral_prompts()) // n_neutral)][:n_neutral]
    meter = shared.get("meter") or CostMeter(lm, texts, seed)
    shared.setdefault("meter", meter)
    sweep = _Sweep(lm, vectors, {"select": select, "test": test}, texts, seed, cache, meter, judge, judge_tokens)
    _run_sweep(sweep, candidates, scales, max_kl, min_gain, break_kl, lm.layout.n_layers,
               fixed_vector=vector is not None, expand=expand, progress=progress)
    memo: dict = shared.setdefault("samples", {})  # greedy samples per setting
    rows = sorted(sweep.rows.values(), key=lambda r: (r["layer"] if r["layer"] is not None else -1, r["scale"]))
    recommended, verdict, rejected = _coherent_choice(lm, vectors, rows, max_kl, min_gain, max_repetition,
                                                      gen_tokens, memo)
    front = pareto_front([r for r in rows if not r["broken"]])
    for r in rows:
        r["on_front"] = r in front
        r["recommended"] = r is recommended

    if rejected:
        verdict += "; passed over for repetitive samples: " + ", ".join(
            f"{r['label']} (repetition {r['repetition']:.2f})" for r in rejected)
    test_report = _test_split(sweep, recommended, compare, system, seed)
    if recommended is not None and "prompt" in test_report:
        verdict += "; " + test_report["vs_prompt_sentence"]
    samples = _samples(lm, vectors, recommended, compare, gen_tokens, memo) if gen_tokens else []

    calibration = Calibration(
        lm.name, rows, front, recommended, verdict, test_report,
        {"layers": candidates, "scales": list(scales), "max_kl": max_kl, "break_kl": break_kl, "min_gain": min_gain,
         "system": system, "judge": judge.spec if judge else "margin",
         "effect_unit": judge.unit if judge else "margin gain, nats/token", "judge_tokens": judge_tokens,
         "expand": expand, "n_train": len(train), "n_select": len(select), "n_test": len(test),
         "n_neutral": len(texts), "seed": seed, "read": read, "from": "vector" if vector is not None else "pairs",
         "resumed_measurements": cache.hits},
        time.perf_counter() - started, samples=samples)
    if out is not None:
        (out / "calibrated.safetensors").unlink(missing_ok=True)  # an earlier run's choice must not outlive this one
        if recommended is not None:
            calibration.vector_path = str(_save_calibrated(vectors[recommended["layer"]], recommended, verdict,
                                                            out / "calibrated.safetensors"))
        calibration.plot_path = str(plot(calibration, out / "calibration.png"))
        calibration.seconds = time.perf_counter() - started
        (out / "calibration.json").write_text(json.dumps(calibration.to_dict(), indent=1))
    return calibration


def _splits(pairs, vector, judge, prompts, seed) -> tuple[list, list, list]:
    """(train pairs, select items, test items): items are pairs (margin) or prompts (a judge)."""
    if prompts is not None:
        prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
        if judge is None:
            raise SteerscaleError("prompts are what a judge reads replies to; the margin is measured on the pairs",
                                  "add --judge, or drop --prompts")
        if len(prompts) < 4:
            raise SteerscaleError(f"a judge needs at least 4 prompts (half select, half test), got {len(prompts)}")
    if pairs is None:
        if vector is None or prompts is None:
            raise SteerscaleError("calibration needs contrastive pairs (to fit directions or measure margins)",
                                  "give --pairs, or a --vector with --judge and --prompts")
        return [], *_halves(prompts, seed)
    pairs = as_pairs(pairs, "calibration")
    if vector is None or judge is None or prompts is None:
        train, select, test = split_pairs(pairs, vector is None, seed)
    else:
        train, select, test = [], [], []
    if judge is None:
        return train, select, test
    if prompts is not None:
        return train, *_halves(prompts, seed)
    if any(not p.prompt for p in select + test):
        raise SteerscaleError("a judge reads replies to prompts, and these pairs have none (full-text pairs)",
                              "give --prompts FILE, or pairs with a \"prompt\" field")
    return train, [p.prompt for p in select], [p.prompt for p in test]


def _halves(items: list, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    half = len(items) // 2
    return [items[i] for i in order[:half]], [items[i] for i in order[half:2 * half]]


def _directions(lm, vector, layers, compare, train, read, seed, progress, log) -> tuple[dict, list]:
    """``({layer: one-site vector}, candidate layers)`` fitted from the train pairs (CAA, one capture pass over the
    candidates, the compare layers and the fine stage's halfway layers), or ``({None: vector}, [None])``."""
    n_layers = lm.layout.n_layers
    if vector is not None:
        if layers not in (None, "auto"):
            raise SteerscaleError("a given vector's layers are fixed; --layers sweeps layers of a vector fitted "
                                  "from --pairs", "drop --layers, or calibrate from pairs without --vector")
        if compare:
            raise SteerscaleError("compare settings name layers, which a given vector fixes",
                                  "compare other strengths by calibrating, or extract from pairs")
        vector.check_compatible(lm.layout)
        return {None: vector}, [None]
    spec = parse_layers(layers, n_layers)
    candidates = auto_layers(n_layers) if spec == "auto" else list(spec)
    for layer, _ in compare:
        parse_layers(layer, n_layers)  # a clear error for a layer the model lacks
    fit_layers = sorted(set(candidates) | {layer for layer, _ in compare} | _fine_layers(candidates))
    log(f"fitting CAA directions at layers {fit_layers} from {len(train)} training pairs")
    fitted = extract(lm, train, "caa", fit_layers, read=read, seed=seed, progress=progress)
    return {s.layer: SteeringVector({s: d}, fitted.model_name, fitted.model_fingerprint, fitted.method,
                                    dict(fitted.metadata, layers=[s.layer]))
            for s, d in fitted.directions.items()}, candidates


def _run_sweep(sweep: _Sweep, candidates, scales, max_kl, min_gain, break_kl, n_layers, *, fixed_vector: bool,
               expand: int = DEFAULT_EXPAND, progress: bool = True) -> None:
    """Coarse to fine. Layer scan: every candidate layer at the reference strength (the one nearest 1). Strength
    sweep: the ``expand`` layers with the largest gain predicted at the budget (``predicted_gain``; 0: every
    layer) at ascending strengths, each stopping at the first whose text breaks. Fine: around the best setting."""
    ref = min(scales, key=lambda s: (abs(math.log(s)), s))
    full = expand == 0 or expand >= len(candidates)
    n_swept = len(candidates) if full else expand
    with tqdm(total=len(candidates) + n_swept * (len(scales) - 1) + 4, desc="calibrate", disable=not progress,
              unit="setting") as bar:
        sweep.bar = bar
        scan = {layer: sweep.measure(Setting(layer, ref), "coarse", break_kl) for layer in candidates}
        ranked = sorted(candidates, key=lambda layer: -predicted_gain(scan[layer], max_kl))
        for layer in ranked[:n_swept]:
            for scale in scales:
                if sweep.measure(Setting(layer, scale), "coarse", break_kl)["broken"]:
                    break
        best, _ = choose(list(sweep.rows.values()), max_kl, min_gain)
        if best is not None:
            for s in _fine_settings(best, candidates, scales, n_layers, fixed_vector):
                sweep.measure(s, "fine", break_kl)
        bar.total = bar.n
        bar.refresh()


def predicted_gain(row: dict, max_kl: float) -> float:
    """The gain a layer would reach at KL = ``max_kl``, from one measured strength: in the small-edit regime the
    margin moves linearly and the KL quadratically with the strength, so gain x sqrt(max_kl / KL). A broken
    setting (no effect measured) ranks last."""
    if row["gain"] is None:
        return -math.inf
    kl = max(row["kl"]["mean"], 1e-9)
    return row["gain"]["diff"] * math.sqrt(max_kl / kl)


def _check_scales(scales) -> list[float]:
    try:
        values = sorted({float(s) for s in scales})
    except (TypeError, ValueError):
        raise SteerscaleError(f"bad strengths {scales!r}",
                              "give positive numbers, e.g. --scales 0.25,0.5,1,2,4") from None
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise SteerscaleError(f"strengths must be positive and finite, got {scales!r}",
                              "negate the vector (or swap the pairs' sides) to steer the other way")
    return values


def _fine_layers(candidates: list[int]) -> set[int]:
    """Halfway layers between neighbouring candidates (fitted up front: the fine stage may need them)."""
    out = set()
    for a, b in zip(candidates, candidates[1:]):
        if b - a >= 2:
            out.add((a + b) // 2)
    return out


def _fine_settings(best: dict, candidates, scales, n_layers, fixed_vector: bool) -> list[Setting]:
    layer, scale = best["layer"], best["scale"]
    i = scales.index(scale) if scale in scales else None
    out = []
    if i is not None:
        if i > 0:
            out.append(Setting(layer, round(math.sqrt(scales[i - 1] * scale), 4)))
        if i + 1 < len(scales):
            out.append(Setting(layer, round(math.sqrt(scales[i + 1] * scale), 4)))
    if not fixed_vector and layer in candidates:
        j = candidates.index(layer)
        for k in (j - 1, j + 1):
            if 0 <= k < len(candidates) and abs(candidates[k] - layer) >= 2:
                out.append(Setting((candidates[k] + layer) // 2, scale))
    return out


def _gain(base, margins, seed) -> dict:
    c = paired_compare(base, margins, seed=seed)
    return {"diff": c.diff, "lo": c.lo, "hi": c.hi, "n": c.n, "p": c.p_permutation}


def _test_split(sweep: _Sweep, recommended, compare, system, seed) -> dict:
    """The recommended setting, the compare settings and the prompting baseline on the test split, each a gain
    over unsteered on the same pairs (or prompts); steering against prompting paired."""
    base = sweep.effect(None, 0.0, "test")
    report: dict = {"n": len(sweep.splits["test"]), "unsteered_effect": bootstrap_ci(base, seed=seed).to_dict(),
                    "settings": []}
    settings = ([("recommended", Setting(recommended["layer"], recommended["scale"]))] if recommended else []) + \
        [("compare", Setting(layer, scale)) for layer, scale in compare]
    margins = {}
    for role, s in settings:
        m = sweep.effect(s.layer, s.scale, "test")
        margins[role, s] = m
        report["settings"].append({"role": role, "label": s.label(), "layer": s.layer, "scale": s.scale,
                                   "gain": _gain(base, m, seed), "kl": sweep.cost(s.layer, s.scale)["kl"]})
    rec = next((m for (role, _), m in margins.items() if role == "recommended"), None)
    if rec is not None:
        for entry, (key, m) in zip(report["settings"], margins.items()):
            if key[0] == "compare":
                entry["recommended_minus_this"] = _gain(m, rec, seed)
    if system:
        prompt = sweep.effect(None, 0.0, "test", system)
        report["prompt"] = {"system": system, "gain": _gain(base, prompt, seed)}
        if rec is not None:
            both = sweep.effect(recommended["layer"], recommended["scale"], "test", system)
            report["prompt_plus_recommended"] = {"gain": _gain(base, both, seed)}
            d = _gain(prompt, rec, seed)
            report["recommended_minus_prompt"] = d
            if d["lo"] > 0:
                say = "steering beats the prompting baseline on the test split"
            elif d["hi"] < 0:
                say = "no setting beats the prompting baseline: the prompt alone does better on the test split"
            else:
                say = "steering and the prompting baseline are not distinguishable on the test split"
            report["vs_prompt_sentence"] = (f"{say} (recommended - prompt {d['diff']:+.3f} "
                                            f"[{d['lo']:+.3f}, {d['hi']:+.3f}])")
    return report


def _coherent_choice(lm, vectors, rows, max_kl, min_gain, max_repetition, gen_tokens, memo, tries: int = 3):
    """``choose``, then the chosen setting's greedy samples: one that loops (repetition above ``max_repetition``)
    is passed over for the next best, up to ``tries`` times. Returns (row, verdict, rows passed over)."""
    rejected = []
    recommended, verdict = choose(rows, max_kl, min_gain)
    while recommended is not None and gen_tokens:
        rep = _sample(lm, vectors[recommended["layer"]], recommended["scale"], gen_tokens, memo)["repetition"]
        recommended["repetition"] = rep
        if rep <= max_repetition:
            break
        rejected.append(recommended)
        if len(rejected) == tries:
            recommended, verdict = None, (f"the {tries} best settings within --max-kl all repeat themselves in "
                                          f"greedy samples (repetition > {max_repetition:g}): no recommendation")
            break
        recommended, verdict = choose([r for r in rows if r not in rejected], max_kl, min_gain)
    return recommended, verdict, rejected


def _sample(lm, vector, scale, gen_tokens, memo: dict) -> dict:
    """Greedy samples at one setting, once per run (``memo``: the coherence check's run is the report's)."""
    key = (_vector_digest(vector) if scale else "-", scale)
    if key not in memo:
        memo[key] = _generate_samples(lm, vector, scale, gen_tokens)
    return memo[key]


def _generate_samples(lm, vector, scale, gen_tokens) -> dict:
    ivs = vector.interventions(scale) if scale else []
    gens = generate(lm.model, lm.tokenizer, lm.layout, list(SAMPLE_PROMPTS), ivs, max_new_tokens=gen_tokens)
    reps = [repetition(g.token_ids) for g in gens]
    return {"texts": [g.text for g in gens], "repetition": sum(reps) / len(reps)}


def _samples(lm, vectors, recommended, compare, gen_tokens, memo) -> list[dict]:
    """Greedy replies to ``SAMPLE_PROMPTS`` unsteered, at the recommendation and at the compare settings, with
    their repetition rate (coherence: a broken steer loops)."""
    runs = [("unsteered", None, 0.0)]
    if recommended is not None:
        runs.append(("recommended " + recommended["label"], recommended["layer"], recommended["scale"]))
    runs += [(f"compare {Setting(layer, scale).label()}", layer, scale) for layer, scale in compare]
    out = []
    for name, layer, scale in runs:
        out.append({"setting": name, **_sample(lm, vectors.get(layer), scale, gen_tokens, memo)})
    return out


def _save_calibrated(vector: SteeringVector, row: dict, verdict: str, path: Path) -> Path:
    scaled = vector * row["scale"]
    scaled.metadata["calibration"] = {"layer": row["layer"], "scale": row["scale"], "gain": row["gain"],
                                      "kl": row["kl"], "verdict": verdict,
                                      "note": "directions pre-multiplied by the chosen strength: use at scale 1"}
    return scaled.save(path)


def calibrated_vector(path: str | Path) -> SteeringVector:
    """The setting a calibration chose, as a vector to apply at scale 1: ``SteeringVector.load`` reads a
    ``calibration.json`` through this (so ``--steer out/cal/calibration.json``, ``bake --steer`` and ``serve
    --vector NAME=...json`` take the calibration itself: its layer and its strength). A vector set's summary gives
    its best vector. A calibration without a recommendation is an error that quotes its verdict."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SteerscaleError(f"cannot read {path} as a calibration ({exc})",
                              "give the calibration.json that steerscale calibrate wrote") from None
    if not isinstance(data, dict) or not ({"recommended", "verdict"} <= set(data) or "vectors" in data):
        raise SteerscaleError(f"{path} is JSON but not a steerscale calibration",
                              "give the calibration.json that steerscale calibrate wrote, or a vector file")
    if not data.get("vector_file"):
        raise SteerscaleError(f"{path} recommends no setting: {data.get('verdict', 'no recommendation')}",
                              "pick a vector and a strength yourself, or recalibrate (e.g. a larger --max-kl)")
    file = path.parent / data["vector_file"]
    if not file.is_file():
        raise SteerscaleError(f"{path} names {file}, which is missing", "rerun steerscale calibrate into that folder")
    return SteeringVector.load(file)


register_reader(".json", calibrated_vector)


def calibrate_set(lm, pairs, vectors: dict[str, SteeringVector], *, out_dir: str | Path | None = None,
                  log=print, **kw) -> dict:
    """Calibrate each of ``vectors`` (name -> vector) on the same pairs, prompts and judge (``calibrate``'s
    keywords), each in ``out_dir/NAME``; the unsteered passes and the measurement cache are shared. Returns (and
    writes as ``out_dir/calibration.json``) one summary row per vector and the best: the largest select-split gain
    among the vectors with a recommendation. ``--steer out_dir/calibration.json`` takes the best one."""
    if not vectors:
        raise SteerscaleError("no vectors to calibrate", "give --vector FILE (repeatable) or a folder of vectors")
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    shared = {"cache": MeasurementCache(out / "measurements.jsonl" if out is not None else None)}
    summary, results = [], {}
    for i, (name, vector) in enumerate(vectors.items()):
        log(f"[{i + 1}/{len(vectors)}] calibrating vector {name!r}")
        cal = calibrate(lm, pairs, vector=vector, out_dir=out / name if out is not None else None, log=log,
                        _shared=shared, **kw)
        results[name] = cal
        rec = next((s for s in cal.test["settings"] if s["role"] == "recommended"), None)
        summary.append({"name": name, "recommended": cal.recommended and cal.recommended["label"],
                        "scale": cal.recommended and cal.recommended["scale"],
                        "select_gain": cal.recommended and cal.recommended["gain"],
                        "test_gain": rec and rec["gain"], "kl": cal.recommended and cal.recommended["kl"],
                        "verdict": cal.verdict, "vector_file": cal.vector_path and f"{name}/calibrated.safetensors"})
    chosen = [s for s in summary if s["recommended"]]
    best = max(chosen, key=lambda s: s["select_gain"]["diff"], default=None)
    verdict = (f"best: {best['name']} at {best['recommended']} (select gain {best['select_gain']['diff']:+.3f})"
               if best else "no vector has a recommended setting")
    report = {"vectors": summary, "best": best and best["name"], "verdict": verdict,
              "vector_file": best and best["vector_file"],
              "steer": best and out is not None and f"{out / best['vector_file']}:1",
              "path": out is not None and str(out / "calibration.json"),
              "seconds": round(time.perf_counter() - started, 1), "results": results}
    if out is not None:
        (out / "calibration.json").write_text(json.dumps({k: v for k, v in report.items() if k != "results"},
                                                         indent=1))
    return report


def render_set_text(report: dict) -> str:
    """One line per vector of a ``calibrate_set`` report, then the best."""
    lines = [f"{'vector':<20} {'setting':<14} {'select gain [95% CI]':<26} {'test gain [95% CI]':<26} {'KL':>6}",
             "-" * 96]
    for s in report["vectors"]:
        if not s["recommended"]:
            lines.append(f"{s['name']:<20} {'none':<14} {s['verdict']}")
            continue
        g, t = s["select_gain"], s["test_gain"]
        lines.append(f"{s['name']:<20} {s['recommended']:<14} {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
                     f"{'':<3} {t['diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]{'':<3} {s['kl']['mean']:6.3f}")
    lines.append(f"verdict: {report['verdict']}")
    if report["steer"]:
        lines.append(f"use it: --steer {report['path']}   (the best vector's setting: --steer {report['steer']})")
    return "\n".join(lines)


def plot(cal: Calibration, path: Path) -> Path:
    """Effect gain against KL, one line per layer (strengths ascending), the Pareto front, the budget, the prompting
    baseline's gain (a band: its interval) and the recommendation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by_layer: dict = {}
    for r in cal.rows:
        if r["gain"] is not None:  # broken settings: no effect measured
            by_layer.setdefault(r["layer"], []).append(r)
    for layer, rs in sorted(by_layer.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        rs = sorted(rs, key=lambda r: r["scale"])
        xs = [r["kl"]["mean"] for r in rs]
        ys = [r["gain"]["diff"] for r in rs]
        err = [[y - r["gain"]["lo"] for y, r in zip(ys, rs)], [r["gain"]["hi"] - y for y, r in zip(ys, rs)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, lw=1,
                    label="vector" if layer is None else f"layer {layer}")
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(f"x{r['scale']:.3g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted(cal.front, key=lambda r: r["kl"]["mean"])
    if front:
        ax.plot([r["kl"]["mean"] for r in front], [r["gain"]["diff"] for r in front], "k:", lw=1, label="Pareto front")
    ax.axvline(cal.config["max_kl"], color="tab:red", ls="--", lw=1, label=f"--max-kl {cal.config['max_kl']:g}")
    prompt = cal.test.get("prompt")
    if prompt:
        g = prompt["gain"]
        ax.axhspan(g["lo"], g["hi"], color="tab:green", alpha=0.12)
        ax.axhline(g["diff"], color="tab:green", lw=1, label=f"prompt \"{prompt['system']}\" (test split)")
    if cal.recommended:
        r = cal.recommended
        ax.plot([r["kl"]["mean"]], [r["gain"]["diff"]], "*", color="gold", mec="k", ms=16,
                label=f"recommended {r['label']}", zorder=5)
    ax.axhline(0, color="grey", lw=0.5)
    if all(r["kl"]["mean"] > 0 for r in cal.rows):  # KL spans decades across strengths
        ax.set_xscale("log")
    ax.set_xlabel("cost: KL(base || steered) on neutral text, nats/token")
    judge = cal.config.get("judge", "margin")
    ax.set_ylabel("effect: margin gain over unsteered (nats/token)" if judge == "margin"
                  else f"effect: gain over unsteered\n{judge[:48]}")
    ax.set_title(f"{cal.model}: calibration (select split, 95% paired bootstrap CI)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_text(cal: Calibration) -> str:
    """The table and the verdict as ``steerscale calibrate`` prints them (and docs/studio.md shows)."""
    lines = [f"{'setting':<14} {'stage':<6} {'gain [95% CI]':<26} {'KL [95% CI]':<24} {'ppl x':>6}  note",
             "-" * 92]
    for r in cal.rows:
        g, kl = r["gain"], r["kl"]
        note = " ".join(n for n, on in (("RECOMMENDED", r["recommended"]), ("front", r["on_front"]),
                                        ("broken (effect not measured)", r["broken"])) if on)
        gain = f"{g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]{'':<3}" if g else f"{'-':<26}"
        lines.append(f"{r['label']:<14} {r['stage']:<6} {gain} {kl['mean']:.3f} [{kl['lo']:.3f}, {kl['hi']:.3f}]"
                     f"{'':<3} {r['ppl_ratio']:6.3f}  {note}")
    t = cal.test
    cfg = cal.config
    unit = cfg.get("effect_unit", "margin gain, nats/token")
    what = "pairs" if cfg.get("judge", "margin") == "margin" else f"prompts, judge {cfg['judge']!r}"
    lines.insert(0, f"effect: {unit} ({cfg.get('judge', 'margin')}); cost: KL on {cfg['n_neutral']} neutral texts")
    lines += ["", f"test split ({t['n']} {what}; gain over unsteered):"]
    for s in t["settings"]:
        g = s["gain"]
        extra = ""
        if "recommended_minus_this" in s:
            d = s["recommended_minus_this"]
            extra = f"   recommended - this {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        lines.append(f"  {s['role']:<12} {s['label']:<12} {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]  "
                     f"KL {s['kl']['mean']:.3f}{extra}")
    if "prompt" in t:
        g = t["prompt"]["gain"]
        lines.append(f"  prompt       {t['prompt']['system']!r:<12} {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
                     "  KL - (context, not model)")
    if "prompt_plus_recommended" in t:
        g = t["prompt_plus_recommended"]["gain"]
        lines.append(f"  prompt + recommended      {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]")
    for s in cal.samples:
        lines.append(f"\n[{s['setting']}] repetition {s['repetition']:.2f}")
        lines += [f"  {text!r}" for text in s["texts"]]
    lines += ["", f"verdict: {cal.verdict}"]
    if cal.vector_path:
        lines.append(f"use it: --steer {cal.vector_path}:1   (steerscale bake / serve --vector take the same file; "
                     f"so does --steer {Path(cal.vector_path).parent / 'calibration.json'})")
    lines.append(f"{cal.seconds:.0f} s; {cal.config['resumed_measurements']} measurement(s) resumed from an "
                 "earlier run")
    return "\n".join(lines)
