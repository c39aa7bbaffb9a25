"""What a method's reading costs against a plain read of the same document, in one process.

Reads DOCUMENT with `full` and each method, round after round (interleaved, so drift on a
shared machine hits every method alike), after one warm-up read, and prints seconds per
round and each method's ratio to `full` over the best rounds. KVzip's scoring is an extra
pass over the document; this is how its cost is checked (issue 13: at most 2x a plain read).

    python -m kvcli.benchmarks.read_cost samples/annual_report.pdf --methods kvzip --ratio 0.25
    python -m kvcli.benchmarks.read_cost samples/annual_report.pdf --methods kvzip,snapkv --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvcli import api
from kvcli.compress.methods import make_press
from kvcli.documents import load_document
from kvcli.models import load_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("document")
    parser.add_argument("--methods", default="kvzip", help="comma-separated methods, timed against full")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="as kvcli's --dtype (auto: the fastest per phase)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    document = load_document(args.document)
    methods = ["full", *[m for m in args.methods.split(",") if m and m != "full"]]
    api.read(model, document, make_press("full"))  # warm-up: allocator, kernels, page cache
    seconds = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            started = time.perf_counter()
            api.read(model, document, make_press(method, ratio=args.ratio))
            seconds[method].append(round(time.perf_counter() - started, 3))
    best = {m: min(s) for m, s in seconds.items()}
    result = {
        "document": args.document, "model": model.name, "device": str(model.device), "precision": model.precision.describe(),
        "threads": torch.get_num_threads(), "ratio": args.ratio, "seconds": seconds,
        "vs_full": {m: round(best[m] / best["full"], 2) for m in methods},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
