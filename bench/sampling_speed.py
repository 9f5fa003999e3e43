"""Engine speed (issue 5 section 7), each variant in a fresh subprocess so peak RSS is its own.

(a) N samples of T tokens: our engine (prompt once, KV expanded) vs ``generate(num_return_sequences=N)``
    vs N sequential ``generate`` calls (EOS ignored everywhere so every variant makes N x T tokens);
(b) P particles extended S steps of K tokens with KV reuse (``LocalBackend.extend``) vs re-encoding the
    texts each step (a batched ``generate`` of K tokens on the padded full texts, as text-level search does),
    twice: after a few-shot prompt of ``--search-shots`` example lines (~17 tokens each; search prompts carry
    worked examples or a system prompt) and after the bare one-line prompt (the worst case for KV reuse);
(c) time to first token for N samples after a ~1,000-token few-shot prompt: encoded once vs HF's batched
    sampling, which encodes it N times.

    nice python bench/sampling_speed.py --tokens 32 --n 16
Last line: one JSON object with vs_hf_batched, vs_sequential, kv_reuse_vs_reencode, shared_prefix_ttft.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."


def _load(args):
    import torch

    torch.set_num_threads(args.threads)
    from steerscale import load_model

    return load_model(args.model)


def _shots(n: int) -> str:
    return "".join(f"Example {i}: The quick brown fox number {i} jumps over the lazy dog near the river bank.\n"
                   for i in range(n))


def _hf(model, tok, text, n, tokens, do_sample=True, seed=0):
    import torch

    enc = tok([text], return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=do_sample,
                              num_return_sequences=n, pad_token_id=tok.pad_token_id, temperature=0.7 if do_sample else None,
                              top_p=None, top_k=None)


def variant(args) -> dict:
    import torch

    from steerscale.scale import Budget, LocalBackend, SamplingParams

    model, tok, layout = _load(args)
    be = LocalBackend(model, tok, layout)
    prompt = PROMPT
    if args.variant in ("kv_reuse", "reencode"):
        prompt = _shots(args.search_shots) + PROMPT
    text = be.format(prompt)
    t = time.perf_counter()
    if args.variant == "ours":
        be.tokens.eos_ids = set()  # benchmark only: fixed-length samples, like min_new_tokens below
        be.sample(PROMPT, args.n, SamplingParams(max_tokens=args.tokens, temperature=0.7, step=None), Budget(), seed=0)
    elif args.variant == "hf_batched":
        _hf(model, tok, text, args.n, args.tokens)
    elif args.variant == "hf_sequential":
        for i in range(args.n):
            _hf(model, tok, text, 1, args.tokens, seed=i)
    elif args.variant == "kv_reuse":
        be.tokens.eos_ids = set()
        b = Budget()
        br = be.start(prompt, args.particles, b, seed=0)
        p = SamplingParams(max_tokens=args.steps * args.step_tokens, temperature=0.7, step="\x00",
                           max_step_tokens=args.step_tokens)
        for _ in range(args.steps):
            be.extend(br, p, b)
            br = be.select(br, list(range(len(br))))  # a resampling round (identity) to include fork cost
    elif args.variant == "reencode":
        texts = [text] * args.particles
        for s in range(args.steps):
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(s)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.step_tokens, min_new_tokens=args.step_tokens,
                                     do_sample=True, temperature=0.7, top_p=None, top_k=None,
                                     pad_token_id=tok.pad_token_id)
            new = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            texts = [a + b for a, b in zip(texts, new)]
    elif args.variant in ("ttft_ours", "ttft_hf"):
        long_prompt = _shots(60) + PROMPT
        if args.variant == "ttft_ours":
            be.sample(long_prompt, args.n, SamplingParams(max_tokens=1, temperature=0.7, step=None), Budget(), seed=0)
        else:
            _hf(model, tok, be.format(long_prompt), args.n, 1)
        n_prompt = len(tok(be.format(long_prompt))["input_ids"])
        return {"seconds": time.perf_counter() - t, "peak_rss_mb": _rss(), "prompt_tokens": n_prompt}
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _rss(), "prompt_tokens": len(tok(text)["input_ids"])}


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sample in (a) (issue: 128)")
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--step-tokens", type=int, default=8)
    ap.add_argument("--search-shots", type=int, default=12, help="example lines before the prompt in (b)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(variant(args)))
        return 0
    res = {}
    keys = ("model", "n", "tokens", "particles", "steps", "step_tokens", "threads", "search_shots")
    runs = [(v, v, args.search_shots) for v in ("ours", "hf_batched", "hf_sequential", "kv_reuse", "reencode")]
    runs += [("kv_reuse_short", "kv_reuse", 0), ("reencode_short", "reencode", 0), ("ttft_ours", "ttft_ours", 0),
             ("ttft_hf", "ttft_hf", 0)]
    for v, variant_name, shots in runs:
        opts = {**vars(args), "search_shots": shots}
        cmd = [sys.executable, __file__, "--variant", variant_name] + [f"--{k.replace('_', '-')}={opts[k]}" for k in keys]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:14s} {res[v]['seconds']:8.2f}s  peak RSS {res[v]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary = {
        "sizes": {"n": args.n, "tokens": args.tokens, "particles": args.particles, "steps": args.steps,
                  "step_tokens": args.step_tokens, "ttft_prompt_tokens": res["ttft_ours"]["prompt_tokens"],
                  "search_prompt_tokens": res["kv_reuse"]["prompt_tokens"],
                  "short_prompt_tokens": res["kv_reuse_short"]["prompt_tokens"],
                  "threads": args.threads},
        "vs_hf_batched": round(res["hf_batched"]["seconds"] / res["ours"]["seconds"], 3),
        "vs_sequential": round(res["hf_sequential"]["seconds"] / res["ours"]["seconds"], 3),
        "kv_reuse_vs_reencode": round(res["reencode"]["seconds"] / res["kv_reuse"]["seconds"], 3),
        "kv_reuse_vs_reencode_short_prompt": round(res["reencode_short"]["seconds"] / res["kv_reuse_short"]["seconds"], 3),
        "shared_prefix_ttft": round(res["ttft_hf"]["seconds"] / res["ttft_ours"]["seconds"], 3),
        "seconds": {k: round(v["seconds"], 3) for k, v in res.items()},
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in res.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
