"""The ``steerscale`` command line: one verb per command.

``COMMANDS`` (a ``steerscale.registry.Registry``) maps each verb to the module that builds it, with the one-line
description ``steerscale --help`` lists. A module exposes ``register(subparsers)``: it adds its verbs' parsers (one
or more; the help line and aliases come from ``COMMANDS``) and sets ``func=handler`` where
``handler(args) -> int``. Add a command with a line in the ``COMMANDS`` table (verb, module, description); a module
that adds a verb the registry lacks, or a registered verb no module adds, fails when the parser is built.
Errors a user can fix (``SteerscaleError``) print as one message and exit 2; ``--debug`` shows the traceback.
``--threads N|auto`` (before or after the verb) fixes torch's CPU threads for the run (``models/threads.py``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from .errors import SteerscaleError
from .registry import Registry


def _commands(table: str) -> Registry[str]:
    """The command registry from a table: per line the verb, its module in ``steerscale.commands`` and the one-line
    help ``steerscale --help`` lists."""
    commands: Registry[str] = Registry("command")
    for line in table.strip().splitlines():
        verb, module, description = line.split(maxsplit=2)
        commands.add(verb, f"steerscale.commands.{module}", description)
    return commands


COMMANDS = _commands("""
models    models_cmd        list bundled models: installed, cached, size, architecture
generate  generate_cmd      generate text, optionally with steering vectors
extract   steer_cmds        extract a steering vector from contrastive pairs
sweep     steer_cmds        probe accuracy per layer (or per head) to choose where to steer
trace     trace_cmd         causal tracing: which layers and positions carry a behaviour (corrupt and restore)
experts   experts_cmd       MoE models: which experts a behaviour uses; write a router steering vector
sae       sae_cmd           sparse-autoencoder features: train (SAELens format), read, steer with or clamp a feature, compare
export    portability_cmds  export a steering vector as a llama.cpp GGUF control vector
import    portability_cmds  import a llama.cpp / repeng GGUF control vector
bake      portability_cmds  fold a steering vector into the biases of a standard HF checkpoint
casal     casal_cmd         amortise a steering vector into one layer's MLP weights (CASAL): a checkpoint that needs no hooks
eval      eval_cmds         evaluate a model on a benchmark task, optionally steered
report    eval_cmds         render Markdown/HTML tables and PNG plots for evaluation runs
solve     scale_cmds        answer a prompt with a search/sampling strategy under a compute budget
program   program_cmd       inference programs: pipelines of generate/critique/rank/fuse stages as data, and their search
navigator navigator_cmd     RL of Thoughts: train a navigator that picks the next reasoning block (reason, refine, ...)
condition   conditional_cmds  fit a CAST condition: steer a prompt only when its activations say so
controller  conditional_cmds  train a controller that sets steering strength per prompt and layer
gate        conditional_cmds  fit a token gate that switches steering on mid-generation (TruthPrInt-style)
serve     serve_cmd         serve a model over an OpenAI-compatible HTTP API (steering per request)
calibrate calibrate_cmd     sweep layers x strengths: effect vs cost vs the prompting baseline; recommend a setting
demo      demo_cmd          the main job: build, apply and measure a steering vector (a few minutes, offline)
""")

THREADS_HELP = ("torch CPU threads: N, or auto (default: the free cores, re-checked while it runs; "
                "also STEERSCALE_THREADS; OMP_NUM_THREADS is respected)")

EPILOG = """\
examples:
  steerscale models                                  # bundled models: installed? cached? size?
  steerscale demo -o out/demo                        # the main job: build, apply and measure a steering vector
  steerscale generate -p "Tell me about cats" --steer out/demo/formal.safetensors:1   # the demo's vector
  steerscale extract --pairs formal_casual --method caa --layers auto -o formal.safetensors
  steerscale serve --vector formal=formal.safetensors   # OpenAI-compatible server, steering per request
  steerscale COMMAND --help                          # each command's options and examples

Commands that load a model take -m/--model: a bundled alias (default smollm2-135m-instruct), an HF id, a directory
or a .gguf.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs with their line breaks: indented lines (the examples) and blank lines exactly as
    written, each run of other lines (prose) one paragraph wrapped to the terminal's width."""

    def _fill_text(self, text, width, indent):
        out, prose = [], []
        for line in text.splitlines() + [""]:
            if line.strip() and not line[:1].isspace():
                prose.append(line.strip())
                continue
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose = []
            out.append(indent + line)
        return "\n".join(out[:-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerscale",
        description="Inference-time intervention on language models: steer representations, scale compute, measure both.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--threads", default=None, metavar="N|auto", help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    verbs = _Verbs(sub)
    for module in dict.fromkeys(COMMANDS.values()):  # each module once, in registration order
        importlib.import_module(module).register(verbs)
    missing = [name for name in COMMANDS if name not in sub.choices]
    if missing:
        raise SteerscaleError(f"registered command(s) {', '.join(missing)} were not added by their module",
                              "register() must call add_parser for every verb COMMANDS names it for")
    return parser


class _Verbs:
    """The subparsers action as a command module sees it: ``add_parser(verb, ...)`` takes the verb's one-line help
    and aliases from ``COMMANDS`` and prints its epilog (the examples) as written; it refuses a verb that is not
    registered there."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name not in COMMANDS or COMMANDS.canonical(name) != name:
            raise SteerscaleError(f"a command module adds verb {name!r}, which steerscale.cli.COMMANDS does not list",
                                  "add a line for it to the COMMANDS table in steerscale/cli.py")
        kwargs["help"] = COMMANDS.description(name)
        kwargs.setdefault("formatter_class", HelpFormatter)  # examples as written (RawDescriptionHelpFormatter)
        kwargs.setdefault("aliases", [a for a, verb in COMMANDS.aliases.items() if verb == name])
        parser = self._sub.add_parser(name, **kwargs)
        # after the verb too, where users put options; SUPPRESS keeps a value given before the verb
        parser.add_argument("--threads", default=argparse.SUPPRESS, metavar="N|auto", help=THREADS_HELP)
        return parser


def _verb(argv: list[str]) -> str | None:
    """The first word that is neither an option nor the value of ``--threads``."""
    it = iter(argv)
    for a in it:
        if a == "--threads":
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = _verb(argv)
    if verb is not None and verb not in COMMANDS:  # the registry's error also guesses the verb meant
        print(f"steerscale: error: {COMMANDS.unknown(verb)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # transformers is chatty about GGUF conversion and generation flags; users asked for steerscale's output.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if args.threads is not None:
            from .models.threads import set_threads

            set_threads(args.threads)  # a bad value fails here, before a model loads
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
