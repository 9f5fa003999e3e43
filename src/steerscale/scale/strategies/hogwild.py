"""``hogwild``: N workers generate at once over one shared KV cache and see each other's tokens as they are written
(Hogwild! inference, Rodionov et al. 2025), so they can split the work and notice duplication without a
coordinator.

* Prompt protocol (``protocol=true``): every worker gets the problem, then one line telling it that it is worker
  ``k`` of ``n``, working together with the others, who see each other's work as it is written (``PROTOCOL``). The
  token prefix the workers' formatted prompts share is encoded once; each worker's own suffix sits beside it in the
  same cache (``engine.shared_cache``). ``protocol=false`` gives every worker the prompt as is.
* Decoding: ``engine.shared_cache.shared_decode`` (one cache, a 4-D mask, per-worker positions; sampling and token
  acceptance by the decoding core). ``see_others=false`` hides the workers from each other: N independent samples
  in one cache (the control the shared run is compared with).
* One budget for all: the prompt (shared prefix once, every suffix) is bought before it is encoded, every step's
  tokens before they are sampled (``Budget.buy_prompt`` / ``buy_tokens``, the backend's ledger rules), so a limit is
  a hard cap over all workers together.
* The answer: a vote over the workers' answers (``select=vote``), the verifier's best (``best``) or a vote weighted
  by its scores (``weighted``).

Needs a local model (``LocalBackend``, also inside ``steerscale serve``, where each forward pass runs on the
server's engine thread between two decoding steps). A remote OpenAI-compatible server cannot share a cache between
requests, and steered backends are not supported: both are refused with a ``SteerscaleError``.
"""

from __future__ import annotations

from ...engine.decoding import seeded_generator
from ...engine.shared_cache import common_prefix, shared_decode
from ...errors import SteerscaleError
from ..backend import Candidate, FinishReason
from ..local import LocalBackend
from .base import Selection, annotate, best_of, check_positive, finish, representative, sampling_params, score, vote

# Short on purpose: SmolLM2-135M answered longer notes (a paragraph on sharing memory and splitting the work,
# before or after the problem) with role play ("I'm not sure what to do with this", "You are my coworker") instead
# of the problem; after this line it still works the problem (docs/reasoning.md). The shared prefix is the problem and the
# line's start; "k" makes each worker's suffix.
PROTOCOL = ("{prompt}\n\nWorker {k} of {n}, working together with the others on this problem (you see their work as "
            "they write it): write your solution.")


def worker_prompt(prompt: str, k: int, n: int, protocol: bool = True) -> str:
    """What worker ``k`` (1-based) of ``n`` is asked."""
    return PROTOCOL.format(prompt=prompt, n=n, k=k) if protocol else prompt


def check_backend(backend) -> LocalBackend:
    if not isinstance(backend, LocalBackend):
        raise SteerscaleError(
            f"strategy 'hogwild' needs one KV cache shared by its workers, which the {getattr(backend, 'name', '?')!r} "
            "backend cannot give (a remote server keeps each request's cache to itself)",
            "run it on a local model (steerscale solve -m MODEL --strategy hogwild, LocalBackend.from_pretrained) or "
            "through steerscale serve's strategy field; against a remote server use e.g. --strategy majority")
    if backend.steering or backend.rules or backend.row_scales is not None or backend.logit_contrast is not None:
        raise SteerscaleError("strategy 'hogwild' does not run a steered backend (steering vectors, prompt rules, "
                              "row scales or a logit contrast)",
                              "drop the steering for this strategy, or use best_of_n / majority with it")
    return backend


def run(prompt, backend, verifier, budget, *, n=2, see_others=True, protocol=True, select=Selection.VOTE, seed=0,
        answer_fn=None, **knobs):
    """``n`` workers over one shared cache; see the module docstring."""
    be = check_backend(backend)
    check_positive("n", n, be.max_n)
    select = Selection.parse(select)
    params = be.with_block(sampling_params(**knobs))
    ids = [be.prompt_ids(worker_prompt(prompt, k + 1, n, protocol)) for k in range(n)]
    k = common_prefix(ids)
    shared, private = ids[0][:k], [i[k:] for i in ids]
    prompt_tokens = len(shared) + sum(len(p) for p in private)
    info = {"workers": n, "see_others": see_others, "protocol": protocol, "shared_prompt_tokens": len(shared),
            "private_prompt_tokens": [len(p) for p in private]}
    if not budget.buy_prompt(prompt_tokens, 1, be.n_params):
        cands = [Candidate(finished=True, finish_reason=FinishReason.BUDGET, meta={"worker": w + 1}) for w in range(n)]
        return finish("hogwild", None, None, cands, budget, [], **info)

    def grant(live: int) -> int:
        if not live or budget.exhausted:  # wall time: checked between tokens
            return 0
        return budget.buy_tokens(live, be.n_params)

    on_model = getattr(be, "_on_loop", None)  # ScheduledBackend: the server's engine thread owns the model
    with_loop = (lambda fn: on_model(fn)) if on_model is not None else None
    out = shared_decode(be.model, be.tokens, shared, private, params, seeded_generator(seed),
                        see_others=see_others, grant=grant, on_model=with_loop)
    cands = []
    for w, (call, end) in enumerate(zip(out.calls, out.ends)):
        cands.append(Candidate(call.text, list(call.ids), list(call.logprobs), [call.text] if call.ids else [],
                               True, end if end is not None else FinishReason.LENGTH, meta={"worker": w + 1}))
    annotate(cands, answer_fn)
    info.update(steps=out.steps, cache_columns=out.columns)
    if select == Selection.VOTE:
        answer, tally = vote(cands)
        return finish("hogwild", answer, representative(cands, answer), cands, budget, [], tally=tally, **info)
    if verifier is None:
        from ..verifiers import LogprobConfidence

        verifier = LogprobConfidence()
    failures = score(verifier, prompt, cands, budget)
    if select == Selection.BEST:
        best = best_of(cands)
        return finish("hogwild", best.answer, best, cands, budget, failures, verifier=verifier.name, **info)
    answer, tally = vote(cands, [0.0 if c.failed or c.score is None else c.score for c in cands])
    return finish("hogwild", answer, representative(cands, answer), cands, budget, failures, tally=tally,
                  verifier=verifier.name, **info)
