"""Inference programs: composed pipelines of prompt and candidate stages, configured as data, run on any backend
within one budget, and a search over them (Archon-style inference-time architecture search).

* ``stages``: the registered stages (``STAGES``): ``prompt``, ``generate``, ``critique``, ``rank``, ``filter``,
  ``vote``, ``fuse`` (and ``handbook``, ``route``, ``concepts``, ``teach``, ``unit_tests`` and ``run_tests`` from
  the modules below);
* ``program``: ``Program`` (a checked list of stages and a final selection), ``load_program`` (a name, a file,
  inline JSON or a dict) and the ready-made ``PROGRAMS``;
* ``entry``: the ``program`` strategy (it registers itself in ``scale.strategies.STRATEGIES``), so ``solve``,
  ``eval`` and the server run a program as they run any strategy;
* ``memory``: a behaviour handbook (metacognitive reuse: behaviours the model writes from its own solved traces,
  retrieved by embedding similarity; the ``handbook`` stage) and a prompt router (per input, the prompt of a pool
  that worked on the nearest development questions; the ``route`` stage);
* ``concepts``: ArcMemo's concept memory (abstract concepts the model writes from its solution traces, selected
  by hidden-state similarity or by the model, updated during a run when asked; the ``concepts`` stage);
* ``teacher``: teacher intervention (a teacher writes an explanation when simulating the student says it helps,
  under a budget of explanations; the ``teach`` stage);
* ``unit_tests``: Archon's unit-test generator and evaluator (``unit_tests``, ``run_tests``; executable checks run
  in a restricted evaluator, never as code);
* ``search``: an optuna search over program configurations on a development split under a total budget, the best
  evaluated on a held-out split.

See docs/programs.md.
"""

from . import entry  # noqa: F401  (registers the "program" strategy)
from .concepts import Concept, ConceptMemory, build_concepts  # registers concepts
from .memory import Behaviour, Handbook, Router, build_handbook, build_router  # registers handbook, route
from .program import DEFAULT_PROGRAM, PROGRAMS, Program, load_program
from .stages import PROMPT_PRESETS, STAGES, Context, Stage, build_stage
from .teacher import TeachStage  # registers teach
from .unit_tests import Check, RunTestsStage, UnitTestsStage  # registers unit_tests, run_tests

__all__ = ["Behaviour", "Check", "Concept", "ConceptMemory", "DEFAULT_PROGRAM", "Handbook", "PROGRAMS",
           "PROMPT_PRESETS", "Router", "RunTestsStage", "STAGES", "Context", "Program", "Stage", "TeachStage", "UnitTestsStage",
           "build_concepts", "build_handbook", "build_router", "build_stage", "load_program"]
