"""Local data files: JSONL tasks, contrastive-pair sets and labelled-prompt sets for steering.

Schemas (one JSON object per line; ``.json`` files holding a list of objects are accepted too):

* task, multiple choice: ``{"question", "choices": [..], "gold": int}`` (optional ``"id"``, ``"labels": [0/1..]``)
* task, generation: ``{"question", "answer"}`` (optional ``"id"``, ``"aliases": [..]``); scored by normalised
  containment of the answer (or an alias) in the reply, and numerically when the answer is a number
* contrastive pairs: ``{"positive", "negative"}`` or ``{"prompt", "positive", "negative"}``
* labelled prompts: ``{"text", "label"}``; or build one from several files of ``{"instruction"}`` rows with
  ``labelled_from_files`` (the layout of ``../shared/data/refusal``)
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import SteerscaleError
from ...answers import last_number, normalize_text, same_number
from .base import Example, GenTask, MCTask, require_fields


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (or a JSON list), with the line number in any error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SteerscaleError(f"data file not found: {path}", "check the path")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SteerscaleError(f"{path}: not valid JSON ({exc})", "use JSONL (one object per line) or a JSON list")
        if not isinstance(rows, list):
            raise SteerscaleError(f"{path}: expected a JSON list of objects", "use JSONL (one object per line)")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SteerscaleError(f"{path}:{n}: not valid JSON ({exc.msg})", "each line must be one JSON object") from None
    if not rows:
        raise SteerscaleError(f"{path} has no rows", "the file is empty")
    return rows


class JSONLMCTask(MCTask):
    def __init__(self, path: str | Path, rows: list[dict]):
        self.path, self._rows = Path(path), rows
        self.name = self.path.stem
        self.description = f"local multiple choice {self.path}"

    def _load_all(self, seed: int) -> list[Example]:
        out = []
        for i, r in enumerate(self._rows):
            where = f"{self.path} row {i + 1}"
            require_fields(r, ("question", "choices", "gold"), where)
            ch = r["choices"]
            if not isinstance(ch, list) or len(ch) < 2 or not isinstance(r["gold"], int) or not 0 <= r["gold"] < len(ch):
                raise SteerscaleError(f"{where}: 'choices' must be a list of >= 2 strings and 'gold' an index into it",
                                      'e.g. {"question": "2+2?", "choices": ["4", "5"], "gold": 0}')
            out.append(Example(id=str(r.get("id", f"{self.name}-{i}")), question=r["question"], choices=list(ch),
                               gold=r["gold"], labels=r.get("labels")))
        return out

    def config(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path.resolve())}


class JSONLGenTask(GenTask):
    max_new_tokens = 64

    def __init__(self, path: str | Path, rows: list[dict]):
        self.path, self._rows = Path(path), rows
        self.name = self.path.stem
        self.description = f"local generation {self.path}"

    def _load_all(self, seed: int) -> list[Example]:
        out = []
        for i, r in enumerate(self._rows):
            require_fields(r, ("question", "answer"), f"{self.path} row {i + 1}")
            out.append(Example(id=str(r.get("id", f"{self.name}-{i}")), question=r["question"], answer=str(r["answer"]),
                               meta={"aliases": [str(r["answer"]), *map(str, r.get("aliases", []))]}))
        return out

    @staticmethod
    def _numeric(example: Example) -> bool:
        return last_number(example.answer) == example.answer.strip()

    def read_answer(self, text: str, example: Example | None = None) -> str | None:
        """A numeric reference: the last number; a text one: the whole reply, normalised."""
        if example is None:
            raise SteerscaleError("a local generation task reads an answer against its example",
                                  "call read_answer(text, example)")
        return last_number(text) if self._numeric(example) else normalize_text(text)

    def check(self, example: Example, text: str) -> dict[str, float]:
        if self._numeric(example):
            return {"acc": float(same_number(self.read_answer(text, example), example.answer))}
        reply = self.read_answer(text, example)
        return {"acc": float(any(normalize_text(a) and normalize_text(a) in reply for a in example.meta["aliases"]))}

    def config(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path.resolve())}


def jsonl_task(path: str | Path):
    """A multiple-choice or generation task from a local file, decided by the first row's fields."""
    rows = read_rows(path)
    first = rows[0] if isinstance(rows[0], dict) else {}
    if "choices" in first:
        return JSONLMCTask(path, rows)
    if "answer" in first:
        return JSONLGenTask(path, rows)
    raise SteerscaleError(f"{path}: cannot tell the task type from fields {sorted(first)}",
                          'multiple choice needs "question", "choices", "gold"; generation needs "question", "answer"')


# -- steering data --------------------------------------------------------------------------------------------
def labelled_from_files(files: dict, field: str = "instruction") -> list[tuple[str, object]]:
    """``{label: path}`` -> ``(text, label)`` tuples, e.g. ``{1: "harmful_train.json", 0: "harmless_train.json"}``."""
    out = []
    for label, path in files.items():
        for i, r in enumerate(read_rows(path)):
            require_fields(r, (field,), f"{path} row {i + 1}")
            out.append((str(r[field]), label))
    return out
