"""Generated tasks from ``reasoning-gym``: any of its datasets by name, seeded, scored by its own checker."""

from __future__ import annotations

from ...answers import answer_line
from ...gym import check_dataset, create_dataset
from .base import Example, GenTask

INSTRUCTION = "Think briefly, then give only the final answer on the last line after 'Answer:'."


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
            self._ds[seed] = create_dataset(self.dataset, size=self.size, seed=seed, **self.kwargs)
        return self._ds[seed]

    def _load_all(self, seed: int) -> list[Example]:
        ds = self._data(seed)
        return [Example(id=f"{self.dataset}-s{seed}-{i}", question=e["question"], answer=str(e["answer"]),
                        meta={"seed": seed, "index": i}) for i, e in enumerate(ds)]

    def check(self, example: Example, text: str) -> dict[str, float]:
        ds = self._data(example.meta["seed"])
        entry = ds[example.meta["index"]]
        return {"acc": float(ds.score_answer(self.read_answer(text, example), entry) or 0.0)}

    def read_answer(self, text: str, example: Example | None = None) -> str | None:
        return answer_line(text)

    def config(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size, "kwargs": self.kwargs}
