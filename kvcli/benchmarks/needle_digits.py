"""Which digits of a needle each (layer, KV head) keeps: the evidence behind Ada-KV's misses.

One RULER needle (a 7-digit number; the embedded model's tokenizer makes every digit one
token) planted in a noise haystack that fits the context, read question-aware with each
method at `--budget` tokens per head. For every (layer, head) it counts how many of the
needle's digit tokens survive: all, some ("split": the head will attend to a partial number),
or none, and whether the answer is right.

    python -m kvcli.benchmarks.needle_digits --methods snapkv,ada-snapkv,ada-snapkv-topk,criticalkv --budget 256
    python -m kvcli.benchmarks.needle_digits --tokens 6000 --max-context 2048 --budget 400   # read in chunks
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from kvcli import api
from kvcli.benchmarks.needle_depth import QUESTION, as_document, haystack
from kvcli.compress.methods import make_press
from kvcli.eval.tasks import NOISE
from kvcli.models import load_model


def digit_positions(layout, number: str) -> list[int]:
    """Prompt positions of the number's digit tokens (found as a run of document ids)."""
    digits = [layout.tokenizer(d, add_special_tokens=False)["input_ids"][-1] for d in number]
    doc = layout.document_ids
    for i in range(len(doc) - len(digits) + 1):
        if doc[i : i + len(digits)] == digits:
            return [len(layout.prefix_ids) + i + k for k in range(len(digits))]
    raise ValueError("the needle's digits are not a run of single tokens in this tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="snapkv,ada-snapkv,ada-snapkv-topk,criticalkv")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4000, help="haystack length")
    parser.add_argument("--depths", default="0.2,0.5,0.8")
    parser.add_argument("--alpha", type=float, default=None, help="Ada-KV floor for the ada methods")
    parser.add_argument("--max-context", type=int, default=None, help="read progressively beyond this many positions")
    parser.add_argument("--pooling", choices=["avg", "max"], default=None, help="SnapKV-family pooling to try")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = load_model("default", device=args.device)
    unit_tokens = len(model.tokenizer(NOISE * 100, add_special_tokens=False)["input_ids"]) / 100
    generation = api.Generation(max_new_tokens=40)
    print("| method | depth | correct | heads keeping all 7 digits | some (split) | none | digits kept (mean of 7) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for depth in [float(d) for d in args.depths.split(",")]:
            text, key, number = haystack(depth, int(args.tokens / unit_tokens), random.Random(f"digits-{depth}"))
            alpha = args.alpha if args.alpha is not None and method.startswith("ada") else None
            press = make_press(method, budget=args.budget, alpha=alpha)
            if args.pooling:
                press.scorer.pooling = args.pooling
            result, compressed = api.ask(model, as_document(text, "haystack"), QUESTION.format(key=key), press=press, generation=generation,
                                          max_context=args.max_context)
            digits = set(digit_positions(compressed.layout, number))
            counts, kept_total, pairs = Counter(), 0, 0
            for layer in compressed.cache.layers:
                for h in range(layer.num_kv_heads):
                    # the question-aware cache also holds the answer's rows: count prompt positions only
                    kept = len(digits & set(layer.head_rows(0, h)[2].tolist()))
                    counts["all" if kept == len(digits) else "none" if kept == 0 else "some"] += 1
                    kept_total += kept
                    pairs += 1
            ok = number in result.answer
            label = f"{method} ({args.pooling} pooling)" if args.pooling else method
            print(f"| {label} | {depth:g} | {'yes' if ok else 'no'} | {counts['all']}/{pairs} | {counts['some']}/{pairs} | "
                  f"{counts['none']}/{pairs} | {kept_total / pairs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
