"""The ``program`` strategy: a pipeline run wherever a strategy runs (``steerscale solve --strategy program``,
``eval --strategy program``, the server's ``{"strategy": {"name": "program", "program": ...}}``).

Its knob ``program`` is a registered program name, a ``.json``/``.yaml`` path or inline JSON text (a dict from
Python). The knob is a ``Choice`` whose ``parse`` loads and checks the whole program, so ``StrategySpec`` refuses
a bad program -- an unknown stage, option, strategy knob or verifier -- when the request is parsed (the server
answers 400), before any model is loaded or run.

It registers itself in ``STRATEGIES`` when imported (``steerscale.scale`` imports this package): a program's stages
run the other strategies, so the registry cannot import it without an import cycle.
"""

from __future__ import annotations

import json
from typing import Mapping

from ..strategies import STRATEGIES
from ..strategies.base import Choice
from .program import load_program


class ProgramRef(Choice):
    """Program: a registered name, a .json/.yaml file or inline JSON text."""

    DEFAULT = "generate_rank_fuse"

    @classmethod
    def parse(cls, value) -> str:
        if isinstance(value, Mapping):  # a Python caller's dict: kept as JSON text, so the spec stays JSON-safe
            value = json.dumps(dict(value), sort_keys=True)
        load_program(value)  # every stage checked now, before any model work
        return value


def run_program(prompt, backend, verifier, budget, *, program=ProgramRef.DEFAULT, seed=0, answer_fn=None, **knobs):
    """Run an inference program (see ``steerscale.scale.programs``). Sampling knobs given here (``max_tokens``,
    ``temperature``, ...: a request's or ``eval``'s) apply to every generate stage that does not set them itself; a
    verifier given here (``--verifier``) scores the final candidates before the program's selection (its rank and
    filter stages name their own)."""
    return load_program(str(program)).run(prompt, backend, budget, seed=seed, answer_fn=answer_fn, defaults=knobs,
                                          final_verifier=verifier)


STRATEGIES.add("program", run_program, "an inference program: stages (generate, critique, rank, fuse, ...) as data")
