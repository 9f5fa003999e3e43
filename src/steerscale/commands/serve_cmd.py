"""``steerscale serve``: an OpenAI-compatible HTTP server for one model, with per-request steering and strategies."""

from __future__ import annotations

import argparse

from .common import add_model_args

EPILOG = """\
examples:
  steerscale serve -m smollm2-135m-instruct --vector formal=formal.safetensors --port 8000

  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{
    "model": "smollm2-135m-instruct", "prompt": "The weather today is", "max_tokens": 24,
    "temperature": 0, "steer": [{"vector": "formal", "scale": 6}]}'

  # a scaling strategy server-side: the chosen answer is the one choice, details under "steerscale"
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "messages": [{"role": "user", "content": "Calculate 59 + 8."}], "max_tokens": 64,
    "strategy": {"name": "best_of_n", "verifier": "self_eval", "n": 8, "budget": "tokens=2000"}}'

  # streaming, with the official client: client.chat.completions.create(..., stream=True)
  # register a vector while the server runs (safetensors or GGUF; never pickle), then steer with it by name
  curl -s -X PUT http://127.0.0.1:8000/v1/steering/vectors/formal2 --data-binary @formal.safetensors

  # conditional steering per request: a vector added only when a CAST condition holds, or a learned controller
  steerscale serve --vector refusal=refusal.safetensors --condition harmful=harmful.safetensors --controller ctl=ctl.safetensors
  ... "steer": [{"vector": "refusal", "scale": 4, "condition": "harmful"}]     # or [{"controller": "ctl"}]

  # a token gate (steerscale gate): the vector applies from the first token at which the gate's probe fires
  steerscale serve --vector truth=truth.safetensors --gate untruthful=untruthful.safetensors
  ... "steer": [{"vector": "truth", "scale": 4, "gate": "untruthful"}]

  # SAE features (steerscale sae train/load): added, or clamped per request, in Neuronpedia's shape
  steerscale serve --sae res6=out/sae ...
  ... "steer": [{"layer": "res6", "index": 123, "strength": 4}]   # or with "op": "clamp" (strength 0: off)

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with "stream": true), GET /v1/models,
GET|PUT|DELETE /v1/steering/{vectors,conditions,controllers,gates}[/NAME] (GET /v1/steering/saes), GET /health,
GET /metrics (Prometheus), GET /docs (the API, from /openapi.json). Concurrent requests are batched by one engine loop, each row with its own steering (--max-batch
rows at a time). With --api-key (or STEERSCALE_API_KEY) every /v1 route needs 'Authorization: Bearer KEY'.
Limits: past --max-pending requests in flight a client gets 429 with Retry-After; bodies past --max-body-mb get
413; a request running past --request-timeout is cancelled (408); a client that disconnects is cancelled at
the next decoding step. SIGTERM/SIGINT let requests in flight finish for --shutdown-timeout seconds.
With --engine vllm the same command starts `vllm serve` with steerscale's plugin (vLLM's compiled mode, bf16 unless
--dtype says otherwise; build its venv with scripts/make_vllm_venv.sh): the same "steer" field (and vLLM's own
"vllm_xargs": {"steer": ["formal:4"]}); conditions, controllers, gates, SAE features, logit contrast and strategies
are refused with 400.
A remote search against this (or a vLLM/SGLang/llama.cpp) server: steerscale solve --backend-url URL ...
See docs/serving.md.
"""


def register(sub) -> None:
    p = sub.add_parser("serve",
                       description="Serve one model over an OpenAI-compatible HTTP API (/v1/completions, "
                                   "/v1/chat/completions) with steerscale's extension fields: \"steer\" (registered "
                                   "vectors, per request) and \"strategy\" (an inference-time scaling strategy).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--vector", action="append", default=[], metavar="NAME=PATH",
                   help="register a steering vector (.safetensors or .gguf) under NAME; repeatable")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=PATH",
                   help="register a CAST condition (steerscale condition) under NAME; requests gate a vector "
                        "with it: {\"vector\": V, \"condition\": NAME}; repeatable")
    p.add_argument("--controller", action="append", default=[], metavar="NAME=PATH",
                   help="register a steering controller (steerscale controller) under NAME; requests steer "
                        "with {\"controller\": NAME}; repeatable")
    p.add_argument("--gate", action="append", default=[], metavar="NAME=PATH",
                   help="register a token gate (steerscale gate) under NAME; a request's vector applies from the first "
                        "token at which it fires: {\"vector\": V, \"gate\": NAME}; repeatable")
    p.add_argument("--sae", action="append", default=[], metavar="NAME=DIR",
                   help="register an SAE (an SAELens folder: cfg.json + sae_weights.safetensors; steerscale sae) "
                        "under NAME; requests steer with a feature in Neuronpedia's shape: {\"layer\": NAME, "
                        "\"index\": 123, \"strength\": 4} (added), with \"op\": \"clamp\" (clamped); "
                        "repeatable")
    p.add_argument("--memory", action="append", default=[], metavar="NAME=PATH",
                   help="register a program memory (a handbook, concept memory or router JSON written by steerscale "
                        "program) under NAME; a request's program stage reads it with {\"memory\": NAME} (read-only)")
    p.add_argument("--engine", choices=("local", "vllm"), default="local",
                   help="local: steerscale's own engine (every steering form, strategies). vllm: vLLM underneath "
                        "(scripts/make_vllm_venv.sh), its compiled mode, the same request body for plain steer "
                        "entries; conditions, controllers, gates, SAE features, logit contrast and strategies are "
                        "answered 400 there")
    p.add_argument("--block-corpus", default=None, metavar="DIR",
                   help="provenance-aware decoding: no request generates a verbatim span of --block-k tokens found in "
                        "these .txt/.md documents (a request sends \"block_corpus\": false to opt out)")
    p.add_argument("--block-k", type=int, default=8, help="span length in tokens that --block-corpus blocks (default 8)")
    p.add_argument("--max-n", type=int, default=64, help="cap on n and on prompts per request (default 64)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="rows decoded together by the engine loop (default 16); requests beyond it wait their turn")
    p.add_argument("--model-id", default=None, help="the id clients send as \"model\" (default: the -m value)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $STEERSCALE_API_KEY, else open)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="generation requests in flight (queued or running) before new ones get 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the most max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default 4)")
    p.add_argument("--max-vector-mb", type=float, default=64.0,
                   help="largest file PUT /v1/steering/KIND/NAME takes, in MiB (default 64)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run before it is cancelled (default 600)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds requests in flight get to finish (default 30)")
    p.set_defaults(func=run)


def parse_vector_spec(spec: str, flag: str = "vector") -> tuple[str, str]:
    from ..errors import SteerscaleError

    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SteerscaleError(f"bad --{flag} {spec!r}", f"write NAME=PATH, e.g. --{flag} name=file.safetensors")
    return name.strip(), path.strip()


def run(args) -> int:
    from ..errors import SteerscaleError
    import os

    from ..serve import App, Limits, serve
    from ..serve.schema import ProgramMemory
    from ..steer.conditional import Condition
    from ..steer.controller import SteeringController
    from ..steer.gating import load_gate
    from ..steer.vector import SteeringVector
    from .common import load

    if not 0 <= args.port <= 65535:
        raise SteerscaleError(f"--port {args.port} is not a port number", "use 1-65535, or 0 for any free port")
    shelves = {}
    for flag, kind, load_file in (("vector", "vectors", SteeringVector.load), ("condition", "conditions", Condition.load),
                                  ("controller", "controllers", SteeringController.load),
                                  ("gate", "gates", load_gate), ("memory", "memories", ProgramMemory.load)):
        shelves[kind] = {}
        for spec in getattr(args, flag):  # read every file before the model loads: a bad one fails fast
            name, path = parse_vector_spec(spec, flag)
            if name in shelves[kind]:
                raise SteerscaleError(f"{flag} name {name!r} given twice", f"give each --{flag} its own NAME")
            shelves[kind][name] = load_file(path)
    from ..steer.sae import load_sae

    shelves["saes"] = {}
    for spec in args.sae:
        name, path = parse_vector_spec(spec, "sae")
        if name in shelves["saes"]:
            raise SteerscaleError(f"sae name {name!r} given twice", "give each --sae its own NAME")
        shelves["saes"][name] = load_sae(path)
    if args.max_body_mb <= 0 or args.max_vector_mb <= 0:
        raise SteerscaleError("--max-body-mb and --max-vector-mb must be positive")
    limits = Limits(max_pending=args.max_pending, max_body_bytes=int(args.max_body_mb * 2**20),
                    max_vector_bytes=int(args.max_vector_mb * 2**20), max_tokens_limit=args.max_tokens_limit,
                    request_timeout=args.request_timeout)  # checked before the model loads
    if not args.shutdown_timeout > 0:
        raise SteerscaleError(f"--shutdown-timeout must be positive, got {args.shutdown_timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("STEERSCALE_API_KEY") or None
    if args.engine == "vllm":
        return run_vllm(args, api_key)
    from pathlib import Path

    if args.block_corpus is not None and not Path(args.block_corpus).exists():
        raise SteerscaleError(f"--block-corpus {args.block_corpus} does not exist", "give a directory of .txt/.md files")
    lm = load(args)
    corpus = None
    if args.block_corpus is not None:
        from ..engine.provenance import SpanIndex

        corpus = SpanIndex.from_dir(args.block_corpus, lm.tokenizer, k=args.block_k)
        print(f"blocking verbatim spans of {corpus.k} tokens from {args.block_corpus}: {corpus.describe()}", flush=True)
    app = App(lm.model, lm.tokenizer, lm.layout, model_id=args.model_id or args.model, **shelves,
              max_n=args.max_n, max_batch=args.max_batch, limits=limits, api_key=api_key, block_corpus=corpus)
    serve(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def run_vllm(args, api_key: str | None) -> int:
    """``vllm serve`` with steerscale's plugin in the foreground: the same flags and request body as the local
    server for what vLLM runs (plain steer entries), a 400 for the rest."""
    import os

    from ..errors import SteerscaleError
    from ..models.loading import checkpoint_dir
    from ..vllm.server import serve_command

    for flag in ("condition", "controller", "gate", "block_corpus", "sae", "memory"):
        if getattr(args, flag):
            raise SteerscaleError(f"--{flag.replace('_', '-')} does not run with --engine vllm",
                                  "serve it with the local engine (--engine local)")
    if args.device not in ("auto", "cpu", "cuda"):
        raise SteerscaleError(f"--device {args.device} with --engine vllm", "vLLM places the model itself: omit it")
    vectors = dict(parse_vector_spec(spec) for spec in args.vector)
    dtype = {"auto": "bfloat16"}.get(args.dtype, args.dtype)
    cmd, env = serve_command(checkpoint_dir(args.model), name=args.model_id or args.model, host=args.host,
                             port=args.port or 8000, vectors=vectors, dtype=dtype, max_num_seqs=args.max_batch,
                             api_key=api_key)
    print("starting vLLM:", " ".join(cmd[1:]), flush=True)
    os.execve(cmd[0], cmd, env)  # vLLM replaces this process: signals (SIGTERM, Ctrl-C) reach it directly
