"""The ``steerscale`` command line: one verb per command.

Each command lives in a module that exposes ``register(subparsers)``; it adds its parser and sets
``func=handler`` where ``handler(args) -> int``. Add a command by appending its module to ``COMMAND_MODULES``.
Errors a user can fix (``SteerscaleError``) print as one message and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import SteerscaleError

COMMAND_MODULES = [
    "steerscale.commands.models_cmd",
    "steerscale.commands.generate_cmd",
    "steerscale.commands.steer_cmds",
    "steerscale.commands.portability_cmds",
    "steerscale.commands.eval_cmds",
    "steerscale.commands.scale_cmds",
    "steerscale.commands.serve_cmd",
    "steerscale.commands.demo_cmd",
]

EPILOG = """\
examples:
  steerscale models                                  # bundled models: installed? cached? size?
  steerscale demo -o out/demo                        # the main job: build, apply and measure a steering vector
  steerscale generate -p "Tell me about cats" --steer out/demo/formal.safetensors:6
  steerscale extract --pairs pairs.jsonl --method caa --layers auto -o vec.safetensors
  steerscale serve --vector formal=vec.safetensors   # OpenAI-compatible server, steering per request

Every command takes -m/--model: a bundled alias (default smollm2-135m-instruct), an HF id, a directory or a .gguf.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerscale",
        description="Inference-time intervention on language models: steer representations, scale compute, measure both.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # transformers is chatty about GGUF conversion and generation flags; users asked for steerscale's output.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except SteerscaleError as exc:
        if args.debug:
            raise
        print(f"steerscale: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
