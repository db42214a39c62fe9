"""Command line: python -m minee generate|lens ... (every command has --json)."""
import argparse
import json
import sys

from threadpoolctl import threadpool_limits

import minee

DEFAULT_MODEL = "smollm2-135m"


def cmd_generate(args):
    model = minee.load(args.model)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json, so minee cannot encode a text prompt")
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    if not args.json:
        print(args.prompt, end="", flush=True)
    out = minee.generate(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
                         on_text=stream)
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "prompt_tokens": out.prompt_tokens,
                          "tokens": out.tokens, "text": out.text, "threads": args.threads,
                          "stats": out.stats}, indent=2))
    else:
        s = out.stats
        rate = f", {s['decode_tokens_per_s']:.1f} tokens/s" if s["decode_tokens_per_s"] else ""
        print(f"\n[{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new{rate}, "
              f"{args.threads} BLAS thread(s)]", file=sys.stderr)


def parser():
    p = argparse.ArgumentParser(prog="python -m minee", description=minee.__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd):
        cmd.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"model directory or known name (default {DEFAULT_MODEL}, fetched on first use)")
        cmd.add_argument("--threads", type=int, default=1,
                         help="BLAS threads (default 1: single-token decode is memory-bound and "
                              "extra threads often slow it down on small shared machines)")
        cmd.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.set_defaults(run=cmd_generate)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        with threadpool_limits(args.threads):
            args.run(args)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        print(f"minee: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
