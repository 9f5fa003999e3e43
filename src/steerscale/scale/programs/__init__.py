"""Inference programs: composed pipelines of prompt and candidate stages, configured as data, run on any backend
within one budget, and a search over them (Archon-style inference-time architecture search).

* ``stages``: the registered stages (``STAGES``): ``prompt``, ``generate``, ``critique``, ``rank``, ``filter``,
  ``vote``, ``fuse`` (and ``handbook`` and ``route``, from ``memory``);
* ``program``: ``Program`` (a checked list of stages and a final selection), ``load_program`` (a name, a file,
  inline JSON or a dict) and the ready-made ``PROGRAMS``;
* ``entry``: the ``program`` strategy (it registers itself in ``scale.strategies.STRATEGIES``), so ``solve``,
  ``eval`` and the server run a program as they run any strategy;
* ``memory``: a behaviour handbook (metacognitive reuse: behaviours the model writes from its own solved traces,
  retrieved by embedding similarity; the ``handbook`` stage) and a prompt router (per input, the prompt of a pool
  that worked on the nearest development questions; the ``route`` stage);
* ``search``: an optuna search over program configurations on a development split under a total budget, the best
  evaluated on a held-out split.

See docs/programs.md.
"""

from . import entry  # noqa: F401  (registers the "program" strategy)
from .memory import Behaviour, Handbook, Router, build_handbook, build_router  # registers handbook, route
from .program import DEFAULT_PROGRAM, PROGRAMS, Program, load_program
from .stages import PROMPT_PRESETS, STAGES, Context, Stage, build_stage

__all__ = ["Behaviour", "DEFAULT_PROGRAM", "Handbook", "PROGRAMS", "PROMPT_PRESETS", "Router", "STAGES", "Context",
           "Program", "Stage", "build_handbook", "build_router", "build_stage", "load_program"]
