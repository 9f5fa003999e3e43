"""SAE-feature steering against a mean-difference (CAA) vector and a prompt instruction, for one concept given
as contrastive pairs, at matched cost (AxBench's question, asked of a user's own concept and SAE).

1. The pairs are split; on the training part the SAE feature that best separates the two sides (``steer.sae.read.
   search_features``, Cohen's d of the completions' mean activation) is chosen -- or, with ``select="steering"``,
   of the ``candidates`` best-separating features the one whose addition (at the target KL) moves the *training*
   pairs' margin most -- and a CAA vector is extracted at the SAE's layer.
2. Each steering method's strength is set so its KL on neutral text (``measure.cost.steering_cost``) matches a
   target: adding the feature's decoder row (``feature``), clamping its activation (``clamp``), and CAA.
3. Effect on the held-out pairs: the per-token log-prob margin of the positive over the negative completion,
   minus the unsteered margin, per pair, with a 95% bootstrap interval; the prompting baseline is a system
   instruction with no steering (its cost is its prompt tokens, not a KL on neutral text).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np

from ..engine.generation import generate
from ..errors import SteerscaleError
from ..models.loading import LoadedModel
from ..models.sites import SiteKind
from ..steer.extract import extract
from ..steer.pairs import as_pairs
from ..steer.sae.core import SAE
from ..steer.sae.edits import clamp_interventions, feature_vector
from ..steer.sae.read import feature_acts, search_features
from .cost import steering_cost
from .mc import score_choices
from .stats import bootstrap_ci


def split(pairs: list, n_test: int, seed: int) -> tuple[list, list]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def margins(lm: LoadedModel, held, interventions=(), system: str | None = None) -> np.ndarray:
    """Per held-out pair, mean log-prob per token of the positive completion minus the negative one."""
    scores = score_choices(lm.model, lm.tokenizer, [p.prompt or "" for p in held],
                           [[p.positive, p.negative] for p in held], interventions, layout=lm.layout, system=system)
    return np.array([s["mean_logprobs"][0] - s["mean_logprobs"][1] for s in scores])


def kl_of(lm: LoadedModel, interventions, neutral: Sequence[str] | None) -> float:
    return steering_cost(lm.model, lm.tokenizer, lm.layout, interventions, neutral)["kl"]["mean"]


def match_kl(make: Callable[[float], list], kl: Callable[[list], float], target: float, start: float,
             iters: int = 7) -> tuple[float, float]:
    """The strength ``s > 0`` at which ``kl(make(s))`` is nearest ``target``: doubled or halved from ``start``
    until the target is bracketed, then bisected in log space. Returns ``(s, its KL)``."""
    seen: dict[float, float] = {}

    def at(s: float) -> float:
        if s not in seen:
            seen[s] = kl(make(s))
        return seen[s]

    lo = hi = start
    for _ in range(12):
        if at(hi) >= target:
            break
        lo, hi = hi, hi * 2
    else:
        return hi, at(hi)  # the KL never reached the target: report the strongest tried
    while at(lo) > target and lo > start * 2 ** -12:
        hi, lo = lo, lo / 2
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if at(mid) < target else (lo, mid)
    best = min(seen, key=lambda s: abs(math.log(max(seen[s], 1e-12)) - math.log(target)))
    return best, seen[best]


def _ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 4000, seed: int = 0) -> dict:
    """mean(a) / mean(b) with a paired percentile-bootstrap 95% interval (pairs resampled together)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    den = b[idx].mean(1)
    ok = np.abs(den) > 1e-9
    ratios = a[idx].mean(1)[ok] / den[ok]
    point = float(a.mean() / b.mean()) if abs(b.mean()) > 1e-9 else math.nan
    if ratios.size < n_boot // 2:
        return {"mean": point, "lo": math.nan, "hi": math.nan}
    return {"mean": point, "lo": float(np.percentile(ratios, 2.5)), "hi": float(np.percentile(ratios, 97.5))}


def compare(lm: LoadedModel, sae: SAE, pairs, target_kl: float = 0.1, n_test: int = 12, seed: int = 0,
            system: str = "Be formal.", neutral: Sequence[str] | None = None, feature: int | None = None,
            samples: Sequence[str] = ("How was your weekend?",), sample_tokens: int = 32,
            select: str = "separation", candidates: int = 3, log=print) -> dict:
    """The comparison (module docstring) for ``pairs`` (JSONL path, dicts or ``ContrastPair``s with a prompt
    each). ``feature``: use this SAE feature instead of choosing one; ``select``: ``separation`` or ``steering``."""
    sae.check(lm.layout)
    if sae.site.kind is not SiteKind.RESID_POST:
        raise SteerscaleError(f"the comparison extracts CAA at block outputs; this SAE reads {sae.site.key()}",
                              "use an SAE on a resid_post site (blocks.L.hook_resid_post)")
    if select not in ("separation", "steering"):
        raise SteerscaleError(f"unknown feature selection {select!r}", "use separation or steering")
    if not target_kl > 0:
        raise SteerscaleError(f"target KL must be positive, got {target_kl}")
    pairs = as_pairs(pairs, "the SAE comparison")
    if any(p.prompt is None for p in pairs):
        raise SteerscaleError("the comparison scores completions of a prompt", 'pairs need {"prompt", "positive", '
                              '"negative"} lines')
    if len(pairs) < n_test + 4:
        raise SteerscaleError(f"{len(pairs)} pairs are too few to hold out {n_test}", "give more pairs or lower n_test")
    train, held = split(pairs, n_test, seed)
    log(f"searching {sae.d_sae} features on {len(train)} training pairs")
    ranked = search_features(lm, sae, train, top=sae.d_sae if feature is not None else 20, progress=False)
    if feature is None:
        positive = [s for s in ranked if s.separation > 0]
        if not positive:
            raise SteerscaleError("no SAE feature fires more on the positive side of these pairs",
                                  "name one with feature=, or train an SAE on text closer to the concept")
        chosen = positive[0]
    else:
        select = "given"
        chosen = next(s for s in ranked if s.feature == sae.check_feature(feature))
    log(f"feature {chosen.feature}: separation d={chosen.separation:+.2f} (mean {chosen.mean_positive:.2f} vs "
        f"{chosen.mean_negative:.2f})")
    caa = extract(lm, train, method="caa", layers=[sae.site.layer], read="mean", progress=False)
    caa_norm = float(caa.directions[sae.site].norm())
    kl = lambda ivs: kl_of(lm, ivs, neutral)  # noqa: E731
    selection = []
    if select == "steering":  # the feature's own steering effect on the training pairs decides
        train_base = margins(lm, train)
        for cand in positive[:candidates]:
            vec = feature_vector(sae, cand.feature, lm.layout)
            strength, cand_kl = match_kl(vec.interventions, kl, target_kl, caa_norm / float(vec.directions[sae.site].norm()))
            effect = float((margins(lm, train, vec.interventions(strength)) - train_base).mean())
            selection.append({"feature": cand.feature, "separation": cand.separation, "strength": strength,
                              "kl": cand_kl, "train_effect": effect})
            log(f"candidate {cand.feature}: d={cand.separation:+.2f}, training-pair effect {effect:+.3f} at KL {cand_kl:.3f}")
        chosen = next(c for c in positive if c.feature == max(selection, key=lambda r: r["train_effect"])["feature"])
        log(f"chosen by steering effect: feature {chosen.feature}")
    fvec = feature_vector(sae, chosen.feature, lm.layout)
    # the clamp starts from the feature's largest activation on the positive training texts
    top_act = max(float(a[:, chosen.feature].max()) for a in feature_acts(lm, sae, [p.positive for p in train]))
    methods = {
        "feature": (lambda s: fvec.interventions(s), caa_norm / float(fvec.directions[sae.site].norm())),
        "clamp": (lambda s: clamp_interventions(sae, chosen.feature, s), max(top_act, 1e-3)),
        "caa": (lambda s: caa.interventions(s), 1.0),
    }
    base = margins(lm, held)
    rows = [{"method": "none", "strength": 0.0, "kl": 0.0, "effect": bootstrap_ci(base - base).to_dict(),
             "margin": bootstrap_ci(base).to_dict(), "prefer_positive": float((base > 0).mean())}]
    effects = {}
    for name, (make, start) in methods.items():
        strength, got = match_kl(make, kl, target_kl, start)
        m = margins(lm, held, make(strength))
        effects[name] = m - base
        rows.append({"method": name, "strength": strength, "kl": got, "effect": bootstrap_ci(m - base).to_dict(),
                     "margin": bootstrap_ci(m).to_dict(), "prefer_positive": float((m > 0).mean())})
        log(f"{name:8s} strength {strength:9.3f}  KL {got:.4f}  effect {rows[-1]['effect']['mean']:+.3f} "
            f"[{rows[-1]['effect']['lo']:+.3f}, {rows[-1]['effect']['hi']:+.3f}]")
    m = margins(lm, held, system=system)
    effects["prompt"] = m - base
    rows.append({"method": "prompt", "strength": None, "kl": None, "system": system,
                 "effect": bootstrap_ci(m - base).to_dict(), "margin": bootstrap_ci(m).to_dict(),
                 "prefer_positive": float((m > 0).mean())})
    log(f"prompt   {system!r}  effect {rows[-1]['effect']['mean']:+.3f}")
    outputs = {}
    by_name = {r["method"]: r for r in rows}
    for name in ("none", "feature", "clamp", "caa", "prompt"):
        ivs = methods[name][0](by_name[name]["strength"]) if name in methods else []
        gens = generate(lm.model, lm.tokenizer, lm.layout, list(samples), ivs, max_new_tokens=sample_tokens,
                        system=system if name == "prompt" else None)
        outputs[name] = [g.text for g in gens]
    return {"model": lm.name, "site": sae.site.key(), "feature": vars(chosen), "select": select,
            "selection": selection, "target_kl": target_kl,
            "n_train": len(train), "n_test": len(held), "rows": rows,
            "samples": {name: dict(zip(samples, texts)) for name, texts in outputs.items()},
            "ratios": {"feature_vs_caa": _ratio_ci(effects["feature"], effects["caa"]),
                       "feature_vs_prompt": _ratio_ci(effects["feature"], effects["prompt"]),
                       "clamp_vs_caa": _ratio_ci(effects["clamp"], effects["caa"]),
                       "clamp_vs_feature": _ratio_ci(effects["clamp"], effects["feature"])}}


def table(result: dict) -> str:
    """The comparison as a Markdown table."""
    lines = ["| method | strength | KL on neutral text | effect vs unsteered [95% CI] | prefers positive |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["effect"]
        strength = "-" if r["strength"] is None else f"{r['strength']:.3g}"
        kl = f"system: {r['system']!r}" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['method']} | {strength} | {kl} | {e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] | "
                     f"{r['prefer_positive']:.0%} |")
    return "\n".join(lines)
