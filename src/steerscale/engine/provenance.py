"""Provenance-aware decoding (TraceShield / Prov-Decode, TraceAlign): keep verbatim spans of a given corpus out of
what a model generates.

``SpanIndex`` holds the token k-grams of a user's document set (flagged, private or licensed text). Two uses:

* after the fact (TraceShield): ``spans(ids)`` lists the maximal runs of ``k`` or more tokens of an output that
  occur in one of the documents, so an output can be flagged or refused;
* while decoding (Prov-Decode): ``banned(context)`` gives the next tokens that would complete a corpus k-gram
  after the last ``k - 1`` tokens; the decoding core (``engine.decoding.process_logits``, ``SamplingParams.block``)
  sets their logits to ``-inf``, so no engine (``generate``, every strategy, the server) emits a span of ``k``
  tokens found in the corpus. The context is the prompt and the output so far: continuing a document the prompt
  quotes is blocked too, quoting it in the prompt is not.

The index is a dict from (k-1)-token prefixes to the next tokens seen after them: lookups are one hash per row and
step. A corpus is tokenised with the model's own tokenizer (spans are token spans of that model). Its size is
capped (``MAX_TOKENS``): a corpus too large for memory is refused with that number, never swapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import SteerscaleError

MAX_TOKENS = 5_000_000  # about 1.5 GB of Python dict entries at the most; a larger corpus needs a disk index
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(eq=False)
class SpanIndex:
    """``SpanIndex.from_texts(tokenizer, {name: text}, k=8)``, ``.from_dir(path, tokenizer, k=8)``."""

    k: int
    names: list[str] = field(default_factory=list)
    next_tokens: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    docs_of: dict[tuple[int, ...], int] = field(default_factory=dict)  # a k-gram -> the first document it is in
    n_tokens: int = 0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise SteerscaleError(f"span length k must be an integer >= 2, got {self.k!r}",
                                  "8 blocks verbatim runs of 8 tokens (about 6 words)")

    @classmethod
    def from_token_ids(cls, docs: dict[str, Sequence[int]], k: int = 8) -> "SpanIndex":
        index = cls(k)
        for name, ids in docs.items():
            index.add(name, ids)
        if not index.n_tokens:
            raise SteerscaleError("the corpus is empty", "give documents with text in them")
        return index

    @classmethod
    def from_texts(cls, tokenizer, texts: dict[str, str], k: int = 8) -> "SpanIndex":
        docs = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in texts.items()}
        return cls.from_token_ids({n: list(ids[0] if ids and isinstance(ids[0], list) else ids)
                                   for n, ids in docs.items()}, k)

    @classmethod
    def from_dir(cls, path: str | Path, tokenizer, k: int = 8) -> "SpanIndex":
        """Every text file (``.txt``, ``.md``, ``.rst``, ``.text``) under ``path`` (or the one file ``path``)."""
        root = Path(path)
        if not root.exists():
            raise SteerscaleError(f"corpus {root} does not exist", "give a directory of .txt/.md files or one file")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES)
        texts = {str(p.relative_to(root) if root.is_dir() else p.name): p.read_text(errors="replace") for p in files}
        texts = {n: t for n, t in texts.items() if t.strip()}
        if not texts:
            raise SteerscaleError(f"corpus {root} has no text files with text in them",
                                  f"put documents as {', '.join(TEXT_SUFFIXES)} files there")
        return cls.from_texts(tokenizer, texts, k)

    def add(self, name: str, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        if self.n_tokens + len(ids) > MAX_TOKENS:
            raise SteerscaleError(f"the corpus has more than {MAX_TOKENS:,} tokens, more than this in-memory index "
                                  "holds", "index the documents that matter (the flagged ones), or split the corpus")
        doc = len(self.names)
        self.names.append(name)
        self.n_tokens += len(ids)
        for i in range(len(ids) - self.k + 1):
            gram = tuple(ids[i:i + self.k])
            self.next_tokens.setdefault(gram[:-1], set()).add(gram[-1])
            self.docs_of.setdefault(gram, doc)

    def banned(self, context: Sequence[int]) -> set[int]:
        """Tokens that would end a corpus span of ``k`` tokens right after ``context``."""
        if len(context) < self.k - 1:
            return set()
        return self.next_tokens.get(tuple(context[len(context) - self.k + 1:]), set())

    def spans(self, ids: Sequence[int]) -> list[dict]:
        """Maximal runs of ``ids`` in which every window of ``k`` tokens is a corpus k-gram: ``{"start", "end",
        "document"}`` (token offsets, end exclusive; the document of the run's first k-gram)."""
        ids = [int(i) for i in ids]
        out: list[dict] = []
        for i in range(len(ids) - self.k + 1):
            doc = self.docs_of.get(tuple(ids[i:i + self.k]))
            if doc is None:
                continue
            if out and out[-1]["end"] >= i + self.k - 1:  # overlaps the run before: extend it
                out[-1]["end"] = i + self.k
            else:
                out.append({"start": i, "end": i + self.k, "document": self.names[doc]})
        return out

    def flagged(self, ids: Sequence[int]) -> bool:
        """TraceShield's test: does ``ids`` contain a corpus span of ``k`` or more tokens?"""
        return any(tuple(ids[i:i + self.k]) in self.docs_of for i in range(len(ids) - self.k + 1))

    def describe(self) -> dict:
        return {"documents": len(self.names), "tokens": self.n_tokens, "k": self.k, "prefixes": len(self.next_tokens)}


def veto(logits, index: SpanIndex, contexts: Iterable[Sequence[int]]):
    """``logits`` (rows, vocab) with every token that would complete a corpus span set to ``-inf`` (in place)."""
    import torch

    for row, context in enumerate(contexts):
        banned = [t for t in index.banned(context) if 0 <= t < logits.shape[-1]]
        if banned:
            logits[row, torch.tensor(banned, device=logits.device)] = -torch.inf
    return logits
