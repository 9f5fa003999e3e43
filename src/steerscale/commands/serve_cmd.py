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

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions. Concurrent requests
are batched by one engine loop, each row with its own steering (--max-batch rows at a time). Clients can only
use the vectors registered here with --vector, by NAME.
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
    p.add_argument("--max-n", type=int, default=64, help="cap on n and on prompts per request (default 64)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="rows decoded together by the engine loop (default 16); requests beyond it wait their turn")
    p.add_argument("--model-id", default=None, help="the id clients send as \"model\" (default: the -m value)")
    p.set_defaults(func=run)


def parse_vector_spec(spec: str) -> tuple[str, str]:
    from ..errors import SteerscaleError

    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SteerscaleError(f"bad --vector {spec!r}", "write NAME=PATH, e.g. --vector formal=vec.safetensors")
    return name.strip(), path.strip()


def run(args) -> int:
    from ..errors import SteerscaleError
    from ..serve import App, serve
    from ..steer.vector import SteeringVector
    from .common import load

    if not 0 <= args.port <= 65535:
        raise SteerscaleError(f"--port {args.port} is not a port number", "use 1-65535, or 0 for any free port")
    vectors = {}
    for spec in args.vector:  # read every vector before the model loads: a bad file fails fast
        name, path = parse_vector_spec(spec)
        if name in vectors:
            raise SteerscaleError(f"vector name {name!r} given twice", "give each --vector its own NAME")
        vectors[name] = SteeringVector.load(path)
    lm = load(args)
    app = App(lm.model, lm.tokenizer, lm.layout, model_id=args.model_id or args.model, vectors=vectors,
              max_n=args.max_n, max_batch=args.max_batch)
    serve(app, args.host, args.port)
    return 0
