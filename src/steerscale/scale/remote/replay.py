"""The decode replay: what a server's answer does to a row, decided client-side under ``LocalBackend``'s token
rules, and which requests a round of rows needs. Pure functions; no requests.

* ``advance``: the tokens of a ``Piece`` replayed against the row's limits (``max_tokens``, ``max_step_tokens``,
  its budget share), EOS, the user's stop strings and the step delimiter; the earliest event wins. Steps follow
  ``LocalBackend``'s rule (``scale.backend.step_end``): a delimiter with nothing but whitespace before it does not
  end the step. Stop strings are checked with ``LocalBackend``'s ``find_stop`` on the row's whole text
  (``first_stop``), so one split across two steps or requests (the server sees only what it generates in one
  request) ends the row as it does locally.
* ``plan_requests``: greedy, one request with each distinct row text once (copies share the answer); sampling
  with a seed, one request per distinct text (``n`` = its copies), because a server seeds every prompt of a
  request alike; sampling without a seed, one request with every row's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...engine.decoding import find_stop, step_end
from .readers import MISSING, Piece


@dataclass(frozen=True)
class Outcome:
    text: str
    logprobs: tuple[float, ...]
    status: str  # eos, stop, length: finished; step: the step is done; more: the row goes on in this call
    drop: int = 0  # characters to cut from the end of the call's earlier text: a stop string began there


# at one token, LocalBackend checks EOS, then stop strings, then the length limit, then the step delimiter; the
# step-token limit and the budget only act after that token
_PRIORITY = {"eos": 7, "stop": 6, "length": 5, "delim": 4, "left": 3, "cap": 2, "end": 1}


def first_stop(prev: str, call_text: str, full: str, ends: Sequence[int] | None, n: int,
               stops: Sequence[str]) -> tuple[int, int] | None:
    """LocalBackend's stop check (``find_stop`` on the row's earlier text and the call's text) replayed token by
    token over a piece: ``(k, cut)``, the first token after which a stop string is there and where the call's text
    (``call_text + full``) is cut, or None. It finds what the server cannot: a stop string that began in an
    earlier step or request (e.g. "\\n" + "\\n" forming "\\n\\n"), whose first part the server never saw."""
    if not stops or find_stop(prev, call_text + full, stops) < 0:  # the common case: no token-by-token replay
        return None
    units = enumerate(ends, 1) if ends is not None else [(n, len(full))]  # without offsets the piece is one unit
    for k, end in units:
        cut = find_stop(prev, call_text + full[:end], stops)
        if cut >= 0:
            return k, cut
    return None


def advance(call_text: str, piece: Piece, *, stops: Sequence[str], step: str | None, room: int, left: int,
            cap: int, prev: str = "") -> Outcome:
    """What ``piece`` adds to a row that has generated ``prev`` in earlier calls and ``call_text`` so far in this
    call, under LocalBackend's rules: ``room`` tokens left before ``max_tokens``, ``left`` before
    ``max_step_tokens``, ``cap`` before the budget share. The earliest event wins; at the same token,
    ``_PRIORITY`` decides, and a stop string found client-side comes before the server's report of the same."""
    n = len(piece.logprobs)
    reason = piece.reason
    full = piece.text + (reason if isinstance(reason, str) else "")
    if n == 0:
        return Outcome("", (), "eos" if piece.finish == "stop" and not isinstance(reason, str) else
                       "stop" if piece.finish == "stop" else "length")
    ends = list(piece.offsets[1:]) + [len(full)] if piece.offsets is not None else None
    events = []  # (token count, priority, status, where a client-side stop cuts call_text + full, or None)
    found = first_stop(prev, call_text, full, ends, n, stops)
    if found is not None:
        events.append((found[0], _PRIORITY["stop"], "stop", found[1]))
    if piece.finish == "stop":
        if isinstance(reason, str) and step is not None and reason == step and reason not in stops:
            events.append((n, _PRIORITY["end"], "more", None))  # a delimiter: the step rule below says if it counts
        elif isinstance(reason, str) or (reason is MISSING and stops):
            events.append((n, _PRIORITY["stop"], "stop", None))
        else:
            events.append((n, _PRIORITY["eos"], "eos", None))
    else:
        events.append((n, _PRIORITY["end"], "length", None))  # the server's own limit (its context window)
    for k, key, status in ((room, "length", "length"), (left, "left", "step"), (cap, "cap", "more")):
        if 1 <= k <= n:
            events.append((k, _PRIORITY[key], status, None))
    if step:
        e = step_end(call_text + full, step)
        end = e - len(call_text)
        if e >= 0 and end > 0:
            k = n if ends is None else next((j + 1 for j, e in enumerate(ends) if e >= end), n)
            events.append((k, _PRIORITY["delim"], "step", None))
    k, _, status, cut = min(events, key=lambda e: (e[0], -e[1]))  # min keeps the first of equals
    if cut is not None:  # cut where the stop string begins, in this piece or (drop) in the call's earlier text
        if cut >= len(call_text):
            return Outcome(full[: cut - len(call_text)], piece.logprobs[:k], status)
        return Outcome("", piece.logprobs[:k], status, drop=len(call_text) - cut)
    if k == n:
        text = piece.text if status in ("eos", "stop") else full
    else:  # cut inside the piece: at the end of token k (the whole text when the server gave no offsets)
        text = full[: ends[k - 1]] if ends is not None else full
    return Outcome(text, piece.logprobs[:k], status)


def plan_requests(texts: Sequence[str], *, greedy: bool, seeded: bool) -> list[tuple[list[str], int, list[list[int]]]]:
    """Requests for rows with prompts ``texts``: ``(prompts, n, owners)``, where ``owners[c]`` are the rows that
    take choice ``c`` (choices come prompt by prompt, ``n`` each).

    * Greedy: one request, each distinct text once, its answer copied to every row with that text.
    * Sampling with a seed: one request per distinct text, ``n`` = its rows. A server seeds every prompt of a
      request alike, so prompts sharing one request would draw the same random numbers and the rows would move
      in lockstep; the ``n`` samples of one prompt are independent.
    * Sampling without a seed: one request with every row's text."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    if greedy:
        return [(list(groups), 1, list(groups.values()))]
    if seeded or len(groups) == 1:
        return [([t], len(rows), [[r] for r in rows]) for t, rows in groups.items()]
    return [(list(texts), 1, [[i] for i in range(len(texts))])]

