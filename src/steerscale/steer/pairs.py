"""Contrastive data for steering: pairs files and labelled files (JSONL).

Pairs, one JSON object a line, either
  ``{"positive": TEXT, "negative": TEXT}``                      two full texts, or
  ``{"prompt": TEXT, "positive": COMPLETION, "negative": COMPLETION}``  one prompt, two completions; the chat
  template is applied to the prompt when the model has one, and the completion is appended.
Labelled: ``{"text": TEXT, "label": 0|1}`` (1 = the positive side).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import SteerscaleError


@dataclass(frozen=True)
class ContrastPair:
    positive: str
    negative: str
    prompt: str | None = None  # present when positive/negative are completions of one prompt


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line; a missing, empty or malformed file is a clear error."""
    if not path.is_file():
        raise SteerscaleError(f"data file not found: {path}", "check the path")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SteerscaleError(f"{path}:{n}: not valid JSON ({exc.msg})", "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise SteerscaleError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise SteerscaleError(f"{path} is empty", "a JSONL file needs at least one object a line")
    return rows


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SteerscaleError(f"{where}: field {key!r} is missing or empty",
                              'pairs lines look like {"positive": "...", "negative": "..."} (optionally with "prompt")')
    return value


def load_pairs(source: str | Path | Iterable[dict]) -> list[ContrastPair]:
    """Pairs from a JSONL path or an iterable of dicts."""
    rows = read_jsonl(Path(source)) if isinstance(source, (str, Path)) else list(enumerate(source, 1))
    where = str(source) if isinstance(source, (str, Path)) else "pairs"
    pairs = []
    for n, obj in rows:
        loc = f"{where}:{n}"
        prompt = _text(obj, "prompt", loc) if "prompt" in obj else None
        pairs.append(ContrastPair(_text(obj, "positive", loc), _text(obj, "negative", loc), prompt))
    return pairs


def as_pairs(pairs, who: str) -> list[ContrastPair]:
    """``pairs`` (a JSONL path, dicts or ``ContrastPair`` list) as ``ContrastPair``s, at least 2 of them; ``who``
    names the method in the error (e.g. "LoFiT")."""
    pairs = pairs if pairs and isinstance(pairs, list) and isinstance(pairs[0], ContrastPair) else load_pairs(pairs)
    if len(pairs) < 2:
        raise SteerscaleError(f"{who} needs at least 2 contrastive pairs, got {len(pairs)}")
    return pairs


def load_labelled(source: str | Path | Iterable[dict]) -> list[tuple[str, int]]:
    rows = read_jsonl(Path(source)) if isinstance(source, (str, Path)) else list(enumerate(source, 1))
    out = []
    for n, obj in rows:
        label = obj.get("label")
        if label not in (0, 1, True, False):
            raise SteerscaleError(f"line {n}: label must be 0 or 1, got {label!r}", 'labelled lines look like {"text": "...", "label": 1}')
        out.append((_text(obj, "text", f"line {n}"), int(label)))
    if len({lab for _, lab in out}) < 2:
        raise SteerscaleError("labelled data has only one class", "include examples with label 0 and with label 1")
    return out


def pairs_hash(pairs: list[ContrastPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.positive, p.negative]).encode())
    return h.hexdigest()[:16]


def bundled_pairs(name: str) -> Path:
    """Path of a pairs file shipped with the package (``steerscale/data/pairs/NAME.jsonl``)."""
    path = Path(__file__).resolve().parent.parent / "data" / "pairs" / f"{name}.jsonl"
    if not path.exists():
        available = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise SteerscaleError(f"no bundled pairs set {name!r}", f"available: {', '.join(available)}")
    return path
