"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..models.registry import DEFAULT_MODEL
from ..steer.vector import register_reader


def _calibrated_vector(path):
    """A ``calibration.json`` wherever a vector file is taken (``--steer``, ``bake``, ``serve --vector``): the
    setting ``steerscale calibrate`` chose, layer and strength, at scale 1 (docs/studio.md)."""
    from ..measure.calibrate import calibrated_vector

    return calibrated_vector(path)


register_reader(".json", _calibrated_vector)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"bundled alias, HF id, local directory or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")


PROMPT_KEYS = ("text", "instruction", "prompt")


def add_steer_args(p: argparse.ArgumentParser, conditional: bool = True) -> None:
    """``--steer``/``--scope``; with ``conditional`` also ``--condition``/``--controller``/``--gate`` (run by
    ``generate`` and ``solve``)."""
    p.add_argument("--steer", action="append", default=[], metavar="VEC[:SCALE]",
                   help="apply a steering vector (.safetensors or .gguf) at SCALE (default 1); repeatable")
    p.add_argument("--scope", default="all", metavar="SCOPE",
                   help="token positions to steer: all, prompt, generated, last:K, positions:I,J (default: all)")
    p.add_argument("--logit-contrast", default=None, metavar="SPEC",
                   help="decode from an early-layer logit contrast (docs/logit_contrast.md): dola:high (DoLa: the "
                        "upper half's blocks, one chosen per token by JS divergence), dola:20 (block 20), "
                        "dola:14-22,alpha=0.1, or vista:24,weight=0.5 (early logits added)")
    if not conditional:
        return
    c = p.add_argument_group("conditional steering (docs/conditional.md)")
    c.add_argument("--condition", action="append", default=[], metavar="COND.safetensors",
                   help="apply the --steer vectors only to prompts that meet this CAST condition (steerscale "
                        "condition); repeatable")
    c.add_argument("--condition-rule", choices=("any", "all"), default="any",
                   help="with several --condition: steer when any (default) or all of them hold")
    c.add_argument("--controller", action="append", default=[], metavar="CTL.safetensors[:GAIN]",
                   help="a steering controller (steerscale controller) that sets the strength per prompt; "
                        "GAIN multiplies it (default 1); repeatable")
    c.add_argument("--gate", default=None, metavar="GATE.safetensors",
                   help="a token gate (steerscale gate): the --steer vectors apply, in each sequence, from the first "
                        "generated token at which it fires")


def steering_from_args(args, layout) -> tuple[list, list]:
    """``(interventions, rules)`` from ``--steer``/``--scope`` and the conditional-steering flags: with
    ``--condition`` the vectors become CAST rules; ``--controller`` files are rules; ``--gate`` gates the vectors."""
    from ..errors import SteerscaleError
    from ..steer.conditional import Condition, ConditionalSteering
    from ..steer.controller import SteeringController
    from ..steer.gating import gated, load_gate
    from ..steer.vector import SteeringVector, load_steering, parse_steer_arg

    conditions = [Condition.load(path, layout) for path in getattr(args, "condition", [])]
    gate = getattr(args, "gate", None)
    if (conditions or gate) and not args.steer:
        raise SteerscaleError("--condition and --gate decide when the --steer vectors apply, but none was given",
                              "add --steer VEC[:SCALE]")
    if conditions and gate:
        raise SteerscaleError("use --condition (per prompt) or --gate (per token), not both")
    rules = []
    for spec in getattr(args, "controller", []):
        path, gain = parse_steer_arg(spec)
        ctl = SteeringController.load(path, layout)
        ctl.gain = gain
        rules.append(ctl)
    if conditions:
        for spec in args.steer:
            path, scale = parse_steer_arg(spec)
            rules.append(ConditionalSteering(SteeringVector.load(path), conditions, scale, args.condition_rule,
                                             args.scope))
        return [], rules
    steering = load_steering(args.steer, layout, args.scope)
    return (gated(steering, load_gate(gate, layout)) if gate else steering), rules


def read_prompts(path) -> list[str]:
    """Prompts from a file: ``.jsonl`` -> one JSON object a line, the first of "text", "instruction", "prompt" that
    it has; ``.json`` -> a list of such objects or of strings; any other file -> one prompt per non-blank line."""
    from ..errors import SteerscaleError

    path = Path(path)
    if not path.is_file():
        raise SteerscaleError(f"prompt file not found: {path}", "give a .txt (one prompt a line), .jsonl or .json file")
    if path.suffix == ".jsonl":
        from ..steer.pairs import read_jsonl

        blank = not path.read_text(encoding="utf-8").strip()  # "has no prompts" below, as for the other formats
        prompts = [] if blank else [_prompt_of(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SteerscaleError(f"{path}: not valid JSON ({exc.msg})", 'e.g. [{"instruction": "..."}, ...]') from None
        if not isinstance(rows, list):
            raise SteerscaleError(f"{path}: expected a JSON list of prompts", 'e.g. [{"instruction": "..."}, ...]')
        prompts = [_prompt_of(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SteerscaleError(f"{path} has no prompts", "one prompt per line (or per JSON object)")
    return prompts


def _prompt_of(obj, where: str) -> str:
    from ..errors import SteerscaleError

    if isinstance(obj, str) and obj.strip():
        return obj
    key = next((k for k in PROMPT_KEYS if isinstance(obj, dict) and k in obj), None)
    if key is None or not isinstance(obj[key], str) or not obj[key].strip():
        raise SteerscaleError(f"{where}: no non-empty {' / '.join(map(repr, PROMPT_KEYS))} field",
                              'lines look like {"text": "..."}')
    return obj[key]


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend-*``: run a strategy against an OpenAI-compatible server instead of the local ``-m`` model
    (``solve`` and ``eval --strategy``); ``remote_backend(args)`` turns them into an ``OpenAIBackend``."""
    r = p.add_argument_group("remote generator (instead of loading -m locally)")
    r.add_argument("--backend-url", default=None, metavar="URL",
                   help="run the strategy against an OpenAI-compatible completions server (steerscale serve, vLLM, "
                        "SGLang, llama.cpp), e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--backend-model", default=None, metavar="NAME",
                   help="the served model's name (default: the one model GET /v1/models lists)")
    r.add_argument("--backend-tokenizer", default="auto", metavar="HF_ID_OR_DIR",
                   help="format prompts with this tokenizer's chat template client-side, as a local run does "
                        "(default auto: the served model's own when it is on this machine -- a local directory, a "
                        "bundled alias, the HF cache --, else prompts go raw with a warning; --no-chat: raw)")
    r.add_argument("--backend-params", type=int, default=0, metavar="N",
                   help="the remote model's parameter count, for FLOP accounting (needed for a flops= budget)")
    r.add_argument("--backend-api-key", default=None, metavar="KEY",
                   help="bearer token (default: $OPENAI_API_KEY)")
    r.add_argument("--backend-timeout", type=float, default=120, metavar="S",
                   help="seconds per request; past it the request is abandoned and the server stops it (default 120)")
    r.add_argument("--backend-retries", type=int, default=3, metavar="N",
                   help="retries of a request that got no connection, a dropped one, HTTP 5xx or 429, with "
                        "exponential backoff (default 3; 0: none)")


def remote_backend(args):
    """An ``OpenAIBackend`` from ``--backend-*`` (the server is asked for its model when none is named). Checks
    first what cannot work remotely: local steering vectors, and a flops budget without the model's size."""
    from ..errors import SteerscaleError
    from ..scale.budget import Budget
    from ..scale.remote import OpenAIBackend, list_models

    if args.steer or any(getattr(args, flag, None) for flag in ("steer_scales", "condition", "controller",
                                                                "logit_contrast")):
        raise SteerscaleError("--steer/--steer-scales/--condition/--controller/--logit-contrast run on a local model, "
                              "not through --backend-url",
                              "register vectors on the server (steerscale serve --vector NAME=PATH) and steer "
                              "requests there, or drop --backend-url")
    if "flops" in Budget.parse(args.budget or "").limits and not args.backend_params:
        raise SteerscaleError("a flops budget needs the remote model's size", "pass --backend-params N")
    if args.backend_retries < 0:
        raise SteerscaleError(f"--backend-retries must be 0 or more, got {args.backend_retries}")
    api_key = args.backend_api_key or os.environ.get("OPENAI_API_KEY")
    model = args.backend_model
    if model is None:
        models = list_models(args.backend_url, api_key=api_key, timeout=args.backend_timeout,
                             retries=args.backend_retries)
        if len(models) != 1:
            raise SteerscaleError(f"{args.backend_url} serves {len(models)} models ({', '.join(models) or 'none'})",
                                  "name one with --backend-model")
        model = models[0]
    tokenizer = None
    if args.backend_tokenizer and args.backend_tokenizer != "auto":  # auto: OpenAIBackend looks for it
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.backend_tokenizer)
        except OSError as exc:
            raise SteerscaleError(f"could not load tokenizer {args.backend_tokenizer!r}: {str(exc)[:200]}",
                                  "pass an HF id or a local model directory") from None
    return OpenAIBackend(args.backend_url, model, api_key=api_key, tokenizer=tokenizer,
                         chat=False if args.no_chat else None, timeout=args.backend_timeout,
                         n_params=args.backend_params, retries=args.backend_retries)


def load(args):
    from ..models.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
