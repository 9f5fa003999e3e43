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

formal.safetensors: steerscale extract --pairs formal_casual -o formal.safetensors (see steerscale extract --help).
Conditions, controllers and gates: steerscale condition / controller / gate (docs/conditional.md).
"""


def register(sub) -> None:
    p = sub.add_parser("generate", description="Generate a completion (chat template applied when the model has one).",
                       epilog=EPILOG)
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    add_steer_args(p, gates=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.generation import generate

    lm = load(args)
    steering, rules = steering_from_args(args, lm.layout)
    out = generate(lm.model, lm.tokenizer, lm.layout, [args.prompt], steering, max_new_tokens=args.max_new_tokens,
                   do_sample=args.sample, temperature=args.temperature, seed=args.seed,
                   chat=False if args.no_chat else None, rules=rules, logit_contrast=args.logit_contrast)[0]
    if args.json:
        emit_json({"model": args.model, "prompt": args.prompt, "steer": args.steer, "scope": args.scope,
                   "logit_contrast": args.logit_contrast,
                   "text": out.text, "n_prompt_tokens": out.n_prompt_tokens, "n_new_tokens": out.n_tokens,
                   **out.extra})
    else:
        print(out.text)
    return 0
