"""Generated tasks from ``reasoning-gym``: any of its datasets by name, seeded, scored by its own checker."""

from __future__ import annotations

from ...errors import SteerscaleError
from .base import Example, GenTask

INSTRUCTION = "Think briefly, then give only the final answer on the last line after 'Answer:'."


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


def extract_answer(text: str) -> str:
    """The text after the last ``Answer:`` (else the last non-empty line): what the gym scorer sees."""
    low = text.lower()
    i = low.rfind("answer:")
    if i >= 0:
        return text[i + len("answer:"):].strip().splitlines()[0].strip() if text[i + 7:].strip() else ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_dataset(dataset: str):
    """reasoning-gym's module, after checking that ``dataset`` is one of its datasets (a clear error if not)."""
    rg = _gym()
    if dataset not in rg.factory.DATASETS:
        raise SteerscaleError(f"unknown reasoning-gym dataset {dataset!r}",
                              f"choose one of: {', '.join(sorted(rg.factory.DATASETS)[:30])}, ...")
    return rg


class GymTask(GenTask):
    """``gym:NAME`` -- ``size`` items generated with the load seed (so ``seed`` changes the problems)."""

    max_new_tokens = 128
    instruction = INSTRUCTION

    def __init__(self, dataset: str, size: int = 200, **kwargs):
        check_dataset(dataset)
        self.dataset, self.size, self.kwargs = dataset, size, kwargs
        self.name = f"gym:{dataset}"
        self.description = f"reasoning-gym {dataset} (generated, seeded)"
        self._ds = {}

    def _data(self, seed: int):
        if seed not in self._ds:
            self._ds[seed] = _gym().create_dataset(self.dataset, size=self.size, seed=seed, **self.kwargs)
        return self._ds[seed]

    def _load_all(self, seed: int) -> list[Example]:
        ds = self._data(seed)
        return [Example(id=f"{self.dataset}-s{seed}-{i}", question=e["question"], answer=str(e["answer"]),
                        meta={"seed": seed, "index": i}) for i, e in enumerate(ds)]

    def check(self, example: Example, text: str) -> dict[str, float]:
        ds = self._data(example.meta["seed"])
        entry = ds[example.meta["index"]]
        return {"acc": float(ds.score_answer(extract_answer(text), entry) or 0.0)}

    def config(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "kwargs": self.kwargs}
