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

from tqdm.auto import tqdm

from ..engine.generation import generate
from ..errors import SteerscaleError
from ..steer.extract import extract
from ..steer.layers import parse_layers
from ..steer.pairs import ContrastPair, as_pairs
from ..steer.vector import SteeringVector, fingerprint
from .cost import neutral_prompts, steering_cost
from .mc import score_choices
from .stats import bootstrap_ci, paired_compare

DEFAULT_SCALES = (0.5, 1.0, 2.0, 4.0)  # multiples of the method's own strength (CAA: the mean difference)
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
                "steer": f"{self.vector_path}:1" if self.vector_path else None, "front": self.front,
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
    """Rows no other row beats on both effect (higher gain) and cost (lower KL), cheapest first."""
    def beats(a, b):
        ge = a["gain"]["diff"] >= b["gain"]["diff"] and a["kl"]["mean"] <= b["kl"]["mean"]
        return ge and (a["gain"]["diff"] > b["gain"]["diff"] or a["kl"]["mean"] < b["kl"]["mean"])
    return sorted((r for r in rows if not any(beats(o, r) for o in rows if o is not r)), key=lambda r: r["kl"]["mean"])


def choose(rows: list[dict], max_kl: float, min_gain: float = 0.05) -> tuple[dict | None, str]:
    """The recommended row and a sentence saying why (or why none): the largest gain among rows whose gain
    interval is above zero, whose gain is at least ``min_gain`` (a deterministic model makes even a negligible
    change significant) and whose KL upper bound is within ``max_kl``."""
    effective = [r for r in rows if r["gain"]["lo"] > 0 and r["gain"]["diff"] >= min_gain]
    feasible = [r for r in effective if r["kl"]["hi"] <= max_kl and not r["broken"]]
    if feasible:
        best = max(feasible, key=lambda r: (r["gain"]["diff"], -r["kl"]["mean"]))
        return best, (f"{best['label']}: effect gain {best['gain']['diff']:+.3f} [{best['gain']['lo']:+.3f}, "
                      f"{best['gain']['hi']:+.3f}] at KL {best['kl']['mean']:.3f} (upper bound "
                      f"{best['kl']['hi']:.3f} <= --max-kl {max_kl:g})")
    if not effective:
        top = max(rows, key=lambda r: r["gain"]["diff"], default=None)
        seen = f" (largest gain {top['gain']['diff']:+.3g} at {top['label']})" if top else ""
        return None, (f"no setting has an effect: no gain interval is above zero with a gain of at least "
                      f"{min_gain:g} nats/token{seen}; the vector does not move this behaviour on these pairs at "
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
class _Sweep:
    """Measures settings (cached) against the unsteered margins of one split."""

    def __init__(self, lm, vectors: dict, select, texts, seed, cache):
        self.lm, self.vectors, self.select, self.texts, self.seed, self.cache = lm, vectors, select, texts, seed, cache
        self.bar = None  # the progress bar, while a sweep runs
        self.context = _digest(lm.name, fingerprint(lm.layout), [(p.prompt, p.positive, p.negative) for p in select],
                               texts, seed)
        self.base = self.margins(None, 0.0, select)
        self.rows: dict[Setting, dict] = {}

    def margins(self, layer, scale, pairs, system=None) -> list[float]:
        ivs = self.vectors[layer].interventions(scale) if scale else []
        key = _digest("margins", self.context, _vector_digest(self.vectors[layer]) if scale else "-", scale,
                      [(p.prompt, p.positive, p.negative) for p in pairs], system)
        return self.cache.get_or_measure(key, lambda: pair_margins(self.lm, pairs, ivs, system))

    def cost(self, layer, scale) -> dict:
        key = _digest("cost", self.context, _vector_digest(self.vectors[layer]), scale)
        return self.cache.get_or_measure(key, lambda: steering_cost(
            self.lm.model, self.lm.tokenizer, self.lm.layout, self.vectors[layer].interventions(scale),
            texts=self.texts, seed=self.seed))

    def measure(self, setting: Setting, stage: str, break_kl: float) -> dict:
        if setting in self.rows:
            return self.rows[setting]
        if self.bar is not None:
            self.bar.set_postfix_str(setting.label())
        m = self.margins(setting.layer, setting.scale, self.select)
        cost = self.cost(setting.layer, setting.scale)
        gain = paired_compare(self.base, m, seed=self.seed)
        kl = cost["kl"]
        row = {"label": setting.label(), "layer": setting.layer, "scale": setting.scale, "stage": stage,
               "gain": {"diff": gain.diff, "lo": gain.lo, "hi": gain.hi, "n": gain.n, "p": gain.p_permutation},
               "margin": bootstrap_ci(m, seed=self.seed).to_dict(), "kl": kl, "ppl_ratio": cost["ppl_ratio"],
               "broken": not math.isfinite(kl["mean"]) or kl["mean"] > break_kl}
        self.rows[setting] = row
        if self.bar is not None:
            self.bar.update(1)
        return row


def calibrate(lm, pairs, *, vector: SteeringVector | None = None, layers="auto",
              scales: Sequence[float] = DEFAULT_SCALES, max_kl: float = 0.5, break_kl: float | None = None,
              min_gain: float = 0.05, system: str | None = None, compare: Sequence[tuple[int, float]] = (),
              n_neutral: int = 12, gen_tokens: int = 32, max_repetition: float = 0.5, read: str = "mean",
              seed: int = 0, out_dir: str | Path | None = None, progress: bool = True, log=print) -> Calibration:
    """Sweep layers x strengths for ``pairs`` (or for ``vector``, measured on ``pairs``) and recommend a setting
    under ``max_kl`` (nats/token, KL upper bound on neutral text). See the module docstring for the steps.
    ``min_gain``: the smallest effect gain (nats/token) that counts as an effect. ``break_kl`` (default twice
    ``max_kl``): a layer's sweep stops at the first strength whose mean KL passes it.

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
        raise SteerscaleError(f"min_gain must be 0 or more nats per token, got {min_gain!r}", "e.g. --min-gain 0.05")
    if n_neutral < 2:
        raise SteerscaleError(f"n_neutral must be at least 2, got {n_neutral}")
    pairs = as_pairs(pairs, "calibration")
    train, select, test = split_pairs(pairs, vector is None, seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    cache = MeasurementCache(out / "measurements.jsonl" if out is not None else None)
    vectors, candidates = _directions(lm, vector, layers, compare, train, read, seed, progress, log)

    texts = neutral_prompts()[::max(1, len(neutral_prompts()) // n_neutral)][:n_neutral]
    sweep = _Sweep(lm, vectors, select, texts, seed, cache)
    _run_sweep(sweep, candidates, scales, max_kl, min_gain, break_kl, lm.layout.n_layers,
               fixed_vector=vector is not None, progress=progress)
    memo: dict = {}  # greedy samples per setting
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
    test_report = _test_split(sweep, test, recommended, compare, system, seed)
    if recommended is not None and "prompt" in test_report:
        verdict += "; " + test_report["vs_prompt_sentence"]
    samples = _samples(lm, vectors, recommended, compare, gen_tokens, memo) if gen_tokens else []

    calibration = Calibration(
        lm.name, rows, front, recommended, verdict, test_report,
        {"layers": candidates, "scales": list(scales), "max_kl": max_kl, "break_kl": break_kl, "min_gain": min_gain,
         "system": system, "n_train": len(train), "n_select": len(select), "n_test": len(test), "n_neutral": len(texts),
         "seed": seed, "read": read, "from": "vector" if vector is not None else "pairs",
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
               progress: bool) -> None:
    """Coarse (each layer at ascending strengths, stopping where the text breaks), then fine around the best."""
    with tqdm(total=len(candidates) * len(scales) + 4, desc="calibrate", disable=not progress,
              unit="setting") as bar:
        sweep.bar = bar
        for layer in candidates:
            for scale in scales:
                if sweep.measure(Setting(layer, scale), "coarse", break_kl)["broken"]:
                    bar.update(len(scales) - scales.index(scale) - 1)
                    break
        best, _ = choose(list(sweep.rows.values()), max_kl, min_gain)
        if best is not None:
            for s in _fine_settings(best, candidates, scales, n_layers, fixed_vector):
                sweep.measure(s, "fine", break_kl)
        bar.total = bar.n
        bar.refresh()


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


def _test_split(sweep: _Sweep, test, recommended, compare, system, seed) -> dict:
    """The recommended setting, the compare settings and the prompting baseline on the test pairs, each a gain
    over unsteered on the same pairs; steering against prompting paired."""
    base = sweep.margins(None, 0.0, test)
    report: dict = {"n": len(test), "unsteered_margin": bootstrap_ci(base, seed=seed).to_dict(), "settings": []}
    settings = ([("recommended", Setting(recommended["layer"], recommended["scale"]))] if recommended else []) + \
        [("compare", Setting(layer, scale)) for layer, scale in compare]
    margins = {}
    for role, s in settings:
        m = sweep.margins(s.layer, s.scale, test)
        margins[role, s] = m
        report["settings"].append({"role": role, "label": s.label(), "layer": s.layer, "scale": s.scale,
                                   "gain": _gain(base, m, seed), "kl": sweep.cost(s.layer, s.scale)["kl"]})
    rec = next((m for (role, _), m in margins.items() if role == "recommended"), None)
    if rec is not None:
        for entry, (key, m) in zip(report["settings"], margins.items()):
            if key[0] == "compare":
                entry["recommended_minus_this"] = _gain(m, rec, seed)
    if system:
        prompt = sweep.margins(None, 0.0, test, system)
        report["prompt"] = {"system": system, "gain": _gain(base, prompt, seed)}
        if rec is not None:
            both = sweep.margins(recommended["layer"], recommended["scale"], test, system)
            report["prompt_plus_recommended"] = {"gain": _gain(base, both, seed)}
            d = _gain(prompt, rec, seed)
            report["recommended_minus_prompt"] = d
            if d["lo"] > 0:
                say = "steering beats the prompting baseline on the test pairs"
            elif d["hi"] < 0:
                say = "no setting beats the prompting baseline: the prompt alone does better on the test pairs"
            else:
                say = "steering and the prompting baseline are not distinguishable on the test pairs"
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


def plot(cal: Calibration, path: Path) -> Path:
    """Effect gain against KL, one line per layer (strengths ascending), the Pareto front, the budget, the prompting
    baseline's gain (a band: its interval) and the recommendation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by_layer: dict = {}
    for r in cal.rows:
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
        ax.axhline(g["diff"], color="tab:green", lw=1, label=f"prompt \"{prompt['system']}\" (test pairs)")
    if cal.recommended:
        r = cal.recommended
        ax.plot([r["kl"]["mean"]], [r["gain"]["diff"]], "*", color="gold", mec="k", ms=16,
                label=f"recommended {r['label']}", zorder=5)
    ax.axhline(0, color="grey", lw=0.5)
    if all(r["kl"]["mean"] > 0 for r in cal.rows):  # KL spans decades across strengths
        ax.set_xscale("log")
    ax.set_xlabel("cost: KL(base || steered) on neutral text, nats/token")
    ax.set_ylabel("effect: margin gain over unsteered (nats/token)")
    ax.set_title(f"{cal.model}: calibration (select pairs, 95% paired bootstrap CI)", fontsize=10)
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
                                        ("broken", r["broken"])) if on)
        lines.append(f"{r['label']:<14} {r['stage']:<6} {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
                     f"{'':<3} {kl['mean']:.3f} [{kl['lo']:.3f}, {kl['hi']:.3f}]{'':<3} {r['ppl_ratio']:6.3f}  {note}")
    t = cal.test
    lines += ["", f"test split ({t['n']} pairs, gain over unsteered):"]
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
        lines.append(f"use it: --steer {cal.vector_path}:1   (steerscale bake / serve --vector take the same file)")
    lines.append(f"{cal.seconds:.0f} s; {cal.config['resumed_measurements']} measurement(s) resumed from an "
                 "earlier run")
    return "\n".join(lines)
