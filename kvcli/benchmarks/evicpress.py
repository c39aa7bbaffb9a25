"""Many documents, a Zipf question stream, tiers too small for every full cache: three policies.

The workload of the EVICPRESS paper (joint KV-cache compression and eviction across a
storage hierarchy), replayed through kvcli's own cost model and manager so the policies
are compared in one run, on the same question stream and the same tiers:

  - lru-full: full caches, LRU demotion GPU -> CPU -> disk -> dropped (what LMCache-like
    systems do);
  - compress@R: every cache compressed at one fixed ratio R, same LRU (several R, so a
    baseline of about the joint policy's quality exists);
  - joint(alpha): kvcli.serve.manager's utility policy, choosing per document its configuration
    (method x ratio x kv dtype) and tier.

Time to first token of a request = bytes loaded / measured tier bandwidth + question
prefill, or, for a document held nowhere, prefill of the whole document. Bandwidths (disk
read, host -> GPU copy) and the prefill cost per token are measured on this machine:
with the embedded model on CPU, with a random-weight Llama-3.1-8B on a GPU.

Quality = agreement with full-cache answers, per document and configuration:
  - simulated (default): from a per-document compression sensitivity; the policy sees the
    same numbers it is scored on (a perfect profiler);
  - --real FILES: measured with the embedded model (kvcli.serve.profiling) on pieces of real
    documents; the policy sees agreement on the server's probe questions, the table reports
    agreement on other, held-out questions, so a profile that does not generalize shows.

    python -m kvcli.benchmarks.evicpress --docs 100 --requests 3000 --out evicpress.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time

from kvcli.serve.manager import (
    DEFAULT_CONFIGS,
    CacheManager,
    CacheShape,
    Config,
    Entry,
    LRUManager,
    Tier,
)
from kvcli.serve.tiers import disk_read_bandwidth, host_to_device_bandwidth

# Cache shapes of the models the benchmark can size caches for.
SHAPES = {
    "smollm2-135m-fp32": CacheShape(30, 3, 64, 4),  # the embedded default on CPU
    "llama-3.1-8b-bf16": CacheShape(32, 8, 128, 2),
}
PREFIX_TOKENS = 40
QUESTION_TOKENS = 32
# Held-out questions of --real: never seen by the policy, only used to score it.
HELD_OUT = ("Summarize the document in one sentence.", "Which names, numbers or dates does the document mention?")


class StepClock:
    """The benchmark's clock: one tick per request (frequency half-lives are in requests)."""

    now = 0.0

    def __call__(self):
        return self.now


# ---- quality -------------------------------------------------------------------------------


def simulated_quality(sensitivity: float, config: Config) -> float:
    """Agreement with the full cache: falls with eviction, faster for sensitive documents."""
    if config.method == "full":
        return 1.0
    evicted = 1.0 - config.ratio
    loss = sensitivity * evicted**2 + {"int8": 0.005, "int4": 0.04}.get(config.kv_dtype, 0.0) * (0.5 + sensitivity)
    return max(0.0, 1.0 - loss)


def real_pieces(paths: list[str], words: int, limit: int):
    """Documents cut from real files, `words` words each, taken from the files in turn, at most `limit`."""
    import io
    import itertools

    from kvcli.documents import load_document

    per_file = []
    for path in paths:
        text = load_document(path).text.split()
        per_file.append([" ".join(text[start : start + words]) for start in range(0, max(1, len(text) - words // 2), words)])
    interleaved = [body for group in itertools.zip_longest(*per_file) for body in group if body]
    return [load_document("-", stdin=io.BytesIO(body.encode())) for body in interleaved[:limit]]


def real_profiles(paths: list[str], configs: tuple[Config, ...], words: int, limit: int) -> list[tuple[dict, dict]]:
    """(quality the policy sees, quality it is scored on) per real document piece."""
    from kvcli.models import load_model
    from kvcli.serve.profiling import AgreementProfiler
    from kvcli.serve.service import ModelService

    model = load_model("default")
    manager = CacheManager([Tier("cpu", 0, math.inf)], ModelService.shape_of(model), configs=configs)
    profiler = AgreementProfiler(model, manager.configs)
    profiles = []
    pieces = real_pieces(paths, words, limit)
    for k, document in enumerate(pieces):
        print(f"profiling document {k + 1}/{len(pieces)}", file=sys.stderr, flush=True)  # minutes on a CPU
        probes = profiler.probe_questions(document)  # what the server asks
        scores = profiler.per_question(document, probes + list(HELD_OUT), list(range(len(configs))))
        seen = {i: statistics.fmean(s[: len(probes)] or [1.0]) for i, s in scores.items()}
        held_out = {i: statistics.fmean(s[len(probes) :] or [1.0]) for i, s in scores.items()}
        profiles.append((seen, held_out))
    return profiles


# ---- cost ------------------------------------------------------------------------------------


def prefill_seconds_per_token(gpu: bool, tokens: int) -> float:
    """Prefill cost per token: a random-weight Llama-3.1-8B on a GPU, the embedded model on CPU."""
    import io

    import torch

    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill

    if gpu:
        from kvcli.attention import install
        from kvcli.benchmarks.e2e import build_model, layout_for

        model = build_model()
        install(model)
        layout = layout_for(torch.randint(0, 128000, (tokens,)).tolist(), False)
    else:
        from kvcli.documents import load_document
        from kvcli.models import load_model
        from kvcli.prompts import PromptLayout

        loaded = load_model("default")
        model = loaded.model
        words = " ".join(f"word{i % 97}" for i in range(tokens // 2))
        layout = PromptLayout.build(loaded.tokenizer, load_document("-", stdin=io.BytesIO(words.encode())).text, None)
    prefill(model, layout, make_press("full"))  # warm up (kernels compiled, memory allocated)
    seconds = []
    for _ in range(2):
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        prefill(model, layout, make_press("full"))
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    del model
    if gpu:
        torch.cuda.empty_cache()
    return min(seconds) / len(layout.all_ids)


# ---- the workload and one policy's run ---------------------------------------------------------


def workload(args, rng: random.Random):
    """Document sizes (log-normal, median --median-tokens), sensitivities, and the question stream."""
    tokens = [int(min(args.max_tokens, max(256, rng.lognormvariate(math.log(args.median_tokens), 0.8)))) for _ in range(args.docs)]
    sensitivity = [rng.betavariate(1.2, 2.5) for _ in range(args.docs)]
    weights = [1.0 / (rank + 1) ** args.zipf for rank in range(args.docs)]
    order = list(range(args.docs))
    rng.shuffle(order)  # popularity is independent of size
    stream = rng.choices(order, weights=weights, k=args.requests)
    return tokens, sensitivity, stream


def run_policy(name, manager: CacheManager, tokens, seen, scored, stream) -> dict:
    """Replay `stream`; `seen[d]` is what the policy knows of document d, `scored[d]` what it is judged by."""
    for d, n in enumerate(tokens):
        manager.add(Entry(f"{d:032x}", f"doc{d}", doc_tokens=n, prefix_tokens=PREFIX_TOKENS, quality=dict(seen[d]), profiled=True))
    ttfts, warm, quality, sources, first = [], [], [], {}, set()
    started = time.perf_counter()
    for step, d in enumerate(stream):
        manager.clock.now = float(step)
        entry, tier, config = manager.access(f"{d:032x}")
        ttfts.append(manager.ttft(entry, config, tier))
        if d in first:  # not the first read, which every policy pays
            warm.append(ttfts[-1])
        first.add(d)
        quality.append(scored[d][config if tier != "none" else 0])
        sources[tier] = sources.get(tier, 0) + 1
        manager.resolve()
    ttfts.sort()
    return {
        "policy": name,
        "mean_ttft_s": statistics.fmean(ttfts),
        "p95_ttft_s": ttfts[int(0.95 * (len(ttfts) - 1))],
        "mean_warm_ttft_s": statistics.fmean(warm),
        "mean_quality": statistics.fmean(quality),
        "served_from": {k: v / len(stream) for k, v in sorted(sources.items())},
        "decisions": len(manager.decisions),
        "policy_seconds": time.perf_counter() - started,
    }


def frontier_ttft(baselines: list[dict], quality: float) -> float | None:
    """The baselines' mean TTFT at exactly `quality`: linear between the two baselines around it;
    below them all, the fastest of them (all better); None above them all."""
    points = sorted((b["mean_quality"], b["mean_ttft_s"]) for b in baselines)
    for (q0, t0), (q1, t1) in zip(points, points[1:]):
        if q0 <= quality <= q1:
            return t0 if q1 == q0 else t0 + (t1 - t0) * (quality - q0) / (q1 - q0)
    if points and quality <= points[0][0]:
        return min(t for _, t in points)
    return None


def compare(rows: list[dict]) -> list[str]:
    """Each joint row against the baselines: the fastest baseline of at least its quality, and
    the baselines' TTFT interpolated at its quality (equal quality)."""
    joint = [r for r in rows if r["policy"].startswith("joint")]
    baselines = [r for r in rows if not r["policy"].startswith("joint")]
    lines = []
    for j in joint:
        peers = [b for b in baselines if b["mean_quality"] >= j["mean_quality"]]
        if peers:
            best = min(peers, key=lambda b: b["mean_ttft_s"])
            j["vs_best_at_least_equal_quality"] = {"baseline": best["policy"], "ratio": best["mean_ttft_s"] / j["mean_ttft_s"]}
            strict = f"{best['mean_ttft_s'] / j['mean_ttft_s']:.2f}x lower mean TTFT than {best['policy']} (quality {best['mean_quality']:.3f})"
        else:
            strict = "no baseline reaches its quality"
        at = frontier_ttft(baselines, j["mean_quality"])
        if at is not None:
            j["vs_baselines_at_equal_quality"] = at / j["mean_ttft_s"]
        equal = f"{at / j['mean_ttft_s']:.2f}x at equal quality (baselines interpolated: {at:.3f} s)" if at is not None else ""
        lines.append(f"{j['policy']} (quality {j['mean_quality']:.3f}): {strict}; {equal}")
    return lines


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of document popularity")
    parser.add_argument("--median-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=32000)
    parser.add_argument("--shape", choices=SHAPES, default=None, help="default: llama-3.1-8b-bf16 with a GPU, else smollm2-135m-fp32")
    parser.add_argument("--fast-fraction", type=float, default=0.05, help="top tier capacity, as a fraction of all full caches")
    parser.add_argument("--cpu-fraction", type=float, default=0.10, help="CPU tier (with a GPU) as a fraction of all full caches")
    parser.add_argument("--disk-fraction", type=float, default=0.30, help="disk tier as a fraction of all full caches (encoded)")
    parser.add_argument("--prefill-seconds-per-token", type=float, default=None, help="default: measured (see the module doc)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prompt length of that measurement (default 8192 on a GPU, 1024 on CPU)")
    parser.add_argument("--alphas", default="0.1,0.5,2")
    parser.add_argument("--ratios", default="0.75,0.5,0.25,0.1", help="fixed ratios of the compress-only baselines")
    parser.add_argument("--real", nargs="*", default=None, help="files cut into documents whose quality is measured with the embedded model")
    parser.add_argument("--real-words", type=int, default=500, help="words per document cut from --real files")
    parser.add_argument("--real-docs", type=int, default=12, help="at most this many measured documents (their profiles are cycled over --docs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    shape_name = args.shape or ("llama-3.1-8b-bf16" if gpu else "smollm2-135m-fp32")
    shape = SHAPES[shape_name]
    rng = random.Random(args.seed)
    tokens, sensitivity, stream = workload(args, rng)
    fixed = [Config("ada-snapkv", float(r)) for r in args.ratios.split(",")]
    configs = tuple(dict.fromkeys([*DEFAULT_CONFIGS, *fixed]))  # every configuration any policy uses
    if args.real:
        measured = real_profiles(args.real, configs, args.real_words, args.real_docs)
        seen = [measured[d % len(measured)][0] for d in range(args.docs)]
        scored = [measured[d % len(measured)][1] for d in range(args.docs)]
        quality_source = (f"measured with the embedded model on {len(measured)} pieces of {args.real_words} words of "
                          f"{', '.join(args.real)} (cycled over the documents); policy sees probe agreement, scored on held-out questions")
    else:
        seen = scored = [{i: simulated_quality(s, c) for i, c in enumerate(configs)} for s in sensitivity]
        quality_source = "simulated: per-document sensitivity ~ Beta(1.2, 2.5); the policy knows it exactly"
    prefill = args.prefill_seconds_per_token or prefill_seconds_per_token(gpu, args.prefill_tokens or (8192 if gpu else 1024))
    with tempfile.TemporaryDirectory() as scratch:
        disk = disk_read_bandwidth(scratch, 64 << 20)
    host = host_to_device_bandwidth() if gpu else math.inf
    full_total = sum((n + PREFIX_TOKENS) * shape.bytes_per_token("auto", False) for n in tokens)

    def tiers() -> list[Tier]:
        top = [Tier("gpu", int(args.fast_fraction * full_total), math.inf), Tier("cpu", int(args.cpu_fraction * full_total), host)] if gpu else [
            Tier("cpu", int(args.fast_fraction * full_total), math.inf)
        ]
        return top + [Tier("disk", int(args.disk_fraction * full_total), 1.0 / (1.0 / disk + 1.0 / host), encoded=True)]

    def run(name, cls, policy_configs, alpha=0.5):
        index = [configs.index(c) for c in policy_configs]
        m = cls(tiers(), shape, configs=tuple(policy_configs), alpha=alpha, prefill_seconds_per_token=prefill,
                question_tokens=QUESTION_TOKENS, half_life=float(args.docs), clock=StepClock())

        def local(qualities):  # renumbered to the policy's own configurations
            return [{j: q[i] for j, i in enumerate(index)} for q in qualities]

        return run_policy(name, m, tokens, local(seen), local(scored), stream)

    rows = [run("lru-full", LRUManager, [configs[0]])]
    rows += [run(f"compress@{c.ratio:g}", LRUManager, [c]) for c in fixed]
    rows += [run(f"joint(alpha={a:g})", CacheManager, list(DEFAULT_CONFIGS), a) for a in map(float, args.alphas.split(","))]
    comparisons = compare(rows)

    setup = {
        "docs": args.docs, "requests": args.requests, "zipf": args.zipf, "shape": shape_name,
        "device": torch.cuda.get_device_name() if gpu else "cpu", "full_cache_total_bytes": full_total,
        "tiers": [{"name": t.name, "capacity": t.capacity, "bandwidth": t.bandwidth} for t in tiers()],
        "prefill_seconds_per_token": prefill, "disk_read_bandwidth": disk, "host_to_device_bandwidth": host,
        "quality": quality_source, "document_tokens": {"median": statistics.median(tokens), "max": max(tokens), "total": sum(tokens)},
    }
    print(f"{args.docs} documents ({sum(tokens):,} tokens, full caches {full_total / 1e9:.2f} GB), {args.requests} questions, Zipf {args.zipf}")
    print("tiers: " + ", ".join(f"{t['name']} {t['capacity'] / 1e9:.2f} GB @ {t['bandwidth'] / 1e9:.2f} GB/s" for t in setup["tiers"]))
    print(f"prefill {prefill * 1e3:.3f} ms/token; quality {quality_source}\n")
    print("| policy | mean TTFT s | p95 TTFT s | mean TTFT s, repeat documents | mean quality | served from |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        served = ", ".join(f"{k} {v:.0%}" for k, v in r["served_from"].items())
        print(f"| {r['policy']} | {r['mean_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} | {r['mean_warm_ttft_s']:.3f} | {r['mean_quality']:.3f} | {served} |")
    print()
    for line in comparisons:
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
