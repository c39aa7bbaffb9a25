"""Needle retrieval across a document of several times the model's context, by needle depth.

One RULER needle ("One of the special magic numbers for KEY is: 1234567.") planted at a
given depth of a noise haystack `--times` x the model's context long (4x: ~32K tokens for
the embedded model's 8,192 positions), asked for after the document. Every method reads the
whole haystack progressively (kvcli.compress.progressive), question-aware, at `--budget` tokens per KV
head; "truncated" is the same model with a full cache of the haystack's first part that fits
(it can only find needles in the first ~1/times of the document). An answer is correct when
it contains the number (RULER's string match).

    python -m kvcli.benchmarks.needle_depth --device cuda --dtype fp32 --out needle.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections import defaultdict

import torch

from kvcli import api
from kvcli.documents import Document, PageSpan
from kvcli.compress.methods import make_press
from kvcli.models import load_model
from kvcli.eval.tasks import NOISE, WORDS

QUESTION = "What is the special magic number for {key} mentioned in the document? Answer with the number only."


def haystack(depth: float, units: int, rng: random.Random) -> tuple[str, str, str]:
    """(document text, key, number): `units` noise units with one needle at `depth`."""
    key = "-".join(rng.sample(WORDS, 2))
    number = str(rng.randint(1_000_000, 9_999_999))
    parts = [NOISE] * units
    parts.insert(round(depth * units), f"One of the special magic numbers for {key} is: {number}. ")
    return "".join(parts), key, number


def as_document(text: str, name: str) -> Document:
    return Document(name=name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), pages=[PageSpan(1, 0, len(text))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: the device's")
    parser.add_argument("--times", type=float, default=4.0, help="haystack length in model contexts")
    parser.add_argument("--depths", default="0,0.1,0.25,0.5,0.75,0.9,1")
    parser.add_argument("--samples", type=int, default=2, help="needles (keys, numbers) per depth")
    parser.add_argument("--methods", default="snapkv,ada-snapkv,pyramid,dynamic,streaming,random,truncated")
    parser.add_argument("--budget", type=int, default=2048, help="document tokens kept per KV head")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = load_model(args.model, device=args.device, dtype=dtypes[args.dtype] if args.dtype else None)
    unit_tokens = len(model.tokenizer(NOISE * 100, add_special_tokens=False)["input_ids"]) / 100
    units = int(args.times * model.context_length / unit_tokens)
    generation = api.Generation(max_new_tokens=48)  # the model often restates the question first; digits are single tokens
    depths = [float(d) for d in args.depths.split(",")]
    records = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        for depth in depths:
            for sample in range(args.samples):
                text, key, number = haystack(depth, units, random.Random(f"{sample}-{depth}"))
                question = QUESTION.format(key=key)
                if method == "truncated":  # the same haystack, cut to what fits with a full cache
                    fits = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
                    keep = int(len(text) * (model.context_length - 200) / fits)
                    result, compressed = api.ask(model, as_document(text[:keep], "haystack"), question, press=make_press("full"), generation=generation)
                else:
                    press = make_press(method, budget=args.budget)
                    result, compressed = api.ask(model, as_document(text, "haystack"), question, press=press, generation=generation, chunk_size=args.chunk_size)
                ok = number in result.answer
                records.append({"method": method, "depth": depth, "sample": sample, "correct": ok, "answer": result.answer,
                                "document_tokens": compressed.document_tokens, "chunks": (compressed.progressive or {}).get("chunks")})
                print(f"{method:10} depth {depth:4} #{sample} {'OK ' if ok else 'no '} {result.answer[:40]!r}", flush=True)
    table = defaultdict(lambda: defaultdict(int))
    for r in records:
        table[r["method"]][r["depth"]] += r["correct"]
    tokens = max(r["document_tokens"] for r in records)
    print(f"\n{tokens} document tokens ({args.times:g}x the context of {model.context_length}), budget {args.budget}/head, "
          f"{args.samples} needles per depth, {time.perf_counter() - started:.0f} s, {model.name} on {model.device} ({model.dtype})")
    print("| method | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |")
    print("|---" * (len(depths) + 2) + "|")
    for method in args.methods.split(","):
        total = sum(table[method].values())
        cells = " | ".join(f"{table[method][d]}/{args.samples}" for d in depths)
        print(f"| {method} | {cells} | {total}/{args.samples * len(depths)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
