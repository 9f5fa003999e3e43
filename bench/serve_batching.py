"""Throughput of ``steerscale serve`` under concurrent clients: the engine loop batches requests, each with its own
steering, against the same requests sent one after another, in one run on one server.

The official ``openai`` client sends ``--clients`` chat requests (greedy, ``--tokens`` new tokens each); every
other request is steered with one of two vectors at a different scale (``extra_body={"steer": [...]}``), the rest
are plain, so steered, unsteered and differently steered rows share the batch. First one at a time, then all at
once from threads. It reports generated tokens per second both ways, their ratio, how many answers are identical
(greedy: batching must not change them), and the engine's forward passes. The vectors are random unit directions
at block 14 scaled to 4 (this measures serving speed, not what the steering does). Last line: one JSON object.

    python bench/serve_batching.py [--clients 8] [--tokens 48] [--max-batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from openai import OpenAI

    from _common import PROMPTS
    from steerscale import Site, SiteKind, load_model
    from steerscale.serve import App, make_server
    from steerscale.steer.vector import SteeringVector

    lm = load_model(args.model)
    site = Site(14, SiteKind.RESID_POST)
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for name in ("v1", "v2"):
        d = torch.randn(lm.layout.site_dim(site), generator=g)
        vectors[name] = SteeringVector({site: 4.0 * d / d.norm()}, model_name=args.model)
    app = App(lm.model, lm.tokenizer, lm.layout, model_id=args.model, vectors=vectors, max_batch=args.max_batch)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none", timeout=600)

    def ask(i: int):
        steer = [{"vector": ("v1", "v2")[(i // 2) % 2], "scale": 0.5 + 0.25 * i}] if i % 2 else []
        r = client.chat.completions.create(model=args.model, temperature=0, max_tokens=args.tokens,
                                           messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           extra_body={"steer": steer})
        return r.choices[0].message.content, r.usage.completion_tokens

    try:
        ask(0)  # warm-up (first forward passes, tokenizer caches)
        steps0 = app.engine.scheduler.steps
        t0 = time.perf_counter()
        sequential = [ask(i) for i in range(args.clients)]
        t_seq = time.perf_counter() - t0
        steps_seq = app.engine.scheduler.steps - steps0

        concurrent: list = [None] * args.clients
        threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(i))) for i in range(args.clients)]
        steps0 = app.engine.scheduler.steps
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_con = time.perf_counter() - t0
        steps_con = app.engine.scheduler.steps - steps0
    finally:
        server.shutdown()
        server.server_close()
        app.close()

    tok_seq = sum(n for _, n in sequential)
    tok_con = sum(n for _, n in concurrent)
    identical = sum(a[0] == b[0] for a, b in zip(sequential, concurrent))
    rate_seq, rate_con = tok_seq / t_seq, tok_con / t_con
    print(f"one at a time: {tok_seq} tokens in {t_seq:.1f} s ({rate_seq:.1f} tok/s, {steps_seq} decoding steps)")
    print(f"{args.clients} concurrent clients: {tok_con} tokens in {t_con:.1f} s ({rate_con:.1f} tok/s, {steps_con} "
          f"decoding steps); throughput x{rate_con / rate_seq:.2f}; identical answers {identical}/{args.clients}")
    print(json.dumps({"bench": "serve_batching", "model": args.model, "clients": args.clients, "tokens": args.tokens,
                      "threads": torch.get_num_threads(), "sequential_tok_per_s": round(rate_seq, 2),
                      "concurrent_tok_per_s": round(rate_con, 2), "throughput_ratio": round(rate_con / rate_seq, 3),
                      "identical_answers": identical, "steps_sequential": steps_seq,
                      "steps_concurrent": steps_con}))


if __name__ == "__main__":
    main()
