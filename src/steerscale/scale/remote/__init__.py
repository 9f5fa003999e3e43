"""The remote backend: every scaling strategy against any OpenAI-compatible ``/v1/completions`` server (vLLM,
SGLang, llama.cpp's ``llama-server``, ``steerscale serve``), with nothing but the standard library. One concept a
module, each importing only those before it:

=============  ==================================================================================================
``client``     the HTTP client: one JSON request on a fresh connection (``http_json``), retries with backoff and
               ``Retry-After``, ``RemoteError``, ``base_url_of``, ``list_models``
``readers``    reading an answer, whatever the server: a generated choice (``read_choice`` -> ``Piece``), echoed
               prompt log-probs (``echo_*`` -> ``Loglikelihood``), the first position's top log-probs
``replay``     the decode replay: what a ``Piece`` does to a row under ``LocalBackend``'s token rules
               (``advance``, ``first_stop`` -> ``Outcome``) and which requests a round needs (``plan_requests``)
``backend``    ``OpenAIBackend``, the ``scale.backend.Backend`` over those, and ``find_tokenizer``
=============  ==================================================================================================

Every public name of the four is importable from here (``from steerscale.scale.remote import OpenAIBackend``).
Everything logs to the logger ``steerscale.scale.remote``.
"""

from .backend import FALLBACK_TOP, MAX_PARALLEL, OpenAIBackend, find_tokenizer
from .client import (HINT, MAX_BACKOFF, MAX_RETRY_AFTER, RemoteError, backoff_delay, base_url_of, http_json,
                     list_models, rejected, retry_after)
from .readers import (MISSING, REASON_KEYS, Loglikelihood, Piece, echo_continuation_logprob, echo_option_logprob,
                      echo_tokens, first_top_logprobs, lookup_top, read_choice)
from .replay import Outcome, advance, first_stop, plan_requests

__all__ = ["FALLBACK_TOP", "HINT", "MAX_BACKOFF", "MAX_PARALLEL", "MAX_RETRY_AFTER", "MISSING", "REASON_KEYS",
           "Loglikelihood", "OpenAIBackend", "Outcome", "Piece", "RemoteError", "advance", "backoff_delay",
           "base_url_of", "echo_continuation_logprob", "echo_option_logprob", "echo_tokens", "find_tokenizer",
           "first_stop", "first_top_logprobs", "http_json", "list_models", "lookup_top", "plan_requests",
           "read_choice", "rejected", "retry_after"]
