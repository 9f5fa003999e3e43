"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import sys

from ..models.registry import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"bundled alias, HF id, local directory or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")


def add_steer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steer", action="append", default=[], metavar="VEC[:SCALE]",
                   help="apply a steering vector (.safetensors or .gguf) at SCALE (default 1); repeatable")
    p.add_argument("--scope", default="all", metavar="SCOPE",
                   help="token positions to steer: all, prompt, generated, last:K, positions:I,J (default: all)")


def load(args):
    from ..models.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def steering_from_args(args, layout):
    from ..steer.vector import load_steering

    return load_steering(args.steer, layout, args.scope)


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
