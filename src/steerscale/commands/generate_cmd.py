"""``steerscale generate``: one prompt, optionally steered."""

from __future__ import annotations

from .common import add_model_args, add_steer_args, emit_json, load, steering_from_args


EPILOG = """\
examples:
  steerscale generate -p "How was your weekend?"                                # greedy, chat template applied
  steerscale generate -p "How was your weekend?" --steer formal.safetensors:1   # toward formal
  steerscale generate -p "How was your weekend?" --steer formal.safetensors:-1 --scope generated   # casual
  steerscale generate -p "The weather today is" --no-chat --sample --seed 1 --max-new-tokens 24 --json
  steerscale generate -p "How do I pick a lock?" --steer refusal.safetensors:4 --condition harmful.safetensors
  steerscale generate -p "How do I pick a lock?" --controller refusal_ctl.safetensors
  steerscale generate -p "Who wrote Hamlet?" --steer truth.safetensors:4 --gate untruthful.safetensors
  steerscale generate -p "What happens if you swallow gum?" --logit-contrast dola:high   # DoLa decoding
  steerscale generate -p "Recite the MIT license." --block-corpus licenses/   # no 8-token span of licenses/*.txt

formal.safetensors: steerscale extract --pairs formal_casual -o formal.safetensors (see steerscale extract --help).
Conditions, controllers and gates: steerscale condition / controller / gate (docs/conditional.md).
"""


def register(sub) -> None:
    p = sub.add_parser("generate", description="Generate a completion (chat template applied when the model has one).",
                       epilog=EPILOG)
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    add_steer_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--block-corpus", default=None, metavar="PATH",
                   help="provenance-aware decoding: never generate a verbatim span of --block-k tokens found in these "
                        ".txt/.md documents (a directory or one file); the JSON output lists spans found in the text")
    p.add_argument("--block-k", type=int, default=8, help="span length in tokens for --block-corpus (default 8)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.generation import generate

    from ..engine.provenance import SpanIndex

    lm = load(args)
    steering, rules = steering_from_args(args, lm.layout)
    block = SpanIndex.from_dir(args.block_corpus, lm.tokenizer, k=args.block_k) if args.block_corpus else None
    out = generate(lm.model, lm.tokenizer, lm.layout, [args.prompt], steering, max_new_tokens=args.max_new_tokens,
                   do_sample=args.sample, temperature=args.temperature, seed=args.seed,
                   chat=False if args.no_chat else None, rules=rules, logit_contrast=args.logit_contrast,
                   block=block)[0]
    if args.json:
        emit_json({"model": args.model, "prompt": args.prompt, "steer": args.steer, "scope": args.scope,
                   "logit_contrast": args.logit_contrast,
                   "text": out.text, "n_prompt_tokens": out.n_prompt_tokens, "n_new_tokens": out.n_tokens,
                   **({"block_corpus": block.describe(), "corpus_spans": block.spans(out.token_ids)} if block else {}),
                   **out.extra})
    else:
        print(out.text)
    return 0
