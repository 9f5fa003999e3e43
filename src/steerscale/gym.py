"""reasoning-gym, the optional dependency, in one place: its import, the dataset-name check and its scorers.

Both the ``gym:NAME`` tasks (``measure``) and the ``gym`` verifier (``scale``) use it, so it sits at the bottom of
the package (it imports only ``errors``).
"""

from __future__ import annotations

import functools

from .errors import SteerscaleError


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise SteerscaleError("reasoning-gym is not installed", "pip install reasoning-gym") from None
    return reasoning_gym


def gym_names() -> list[str]:
    try:
        return sorted(_gym().factory.DATASETS)
    except SteerscaleError:
        return []


def check_dataset(dataset: str):
    """reasoning-gym's module, after checking that ``dataset`` is one of its datasets (a clear error if not)."""
    rg = _gym()
    if dataset not in rg.factory.DATASETS:
        raise SteerscaleError(f"unknown reasoning-gym dataset {dataset!r}",
                              f"choose one of: {', '.join(sorted(rg.factory.DATASETS)[:30])}, ...")
    return rg


def create_dataset(dataset: str, **kwargs):
    """A seeded reasoning-gym dataset (``size=``, ``seed=``, the dataset's own options)."""
    return check_dataset(dataset).create_dataset(dataset, **kwargs)


@functools.lru_cache(maxsize=None)
def scorer(dataset: str):
    """reasoning-gym's ``score_answer(answer, entry)`` for ``dataset``."""
    return check_dataset(dataset).get_score_answer_fn(dataset)
