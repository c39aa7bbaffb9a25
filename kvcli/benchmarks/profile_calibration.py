"""Does the server's profile predict the quality users get? (issue 17)

The joint policy trades quality(c, x), profiled per document by
kvcli.serve.profiling.AgreementProfiler on probe questions, against delay. If the profile
says 0.97 where users' questions get 0.79, it compresses as if compression were free. This
measures both on the serve workload's documents (kvcli.benchmarks.serve_workload: RULER
multi-key needles, one question per needle), in one process, for every managed
configuration:

  - profile: what the server's profiler reports (its probes: generic questions and
    passages at several depths), and beside it the per-token metric it used before (the
    share of teacher-forced positions whose greedy token agrees, wrong tokens or not);
  - users: the needle questions answered greedily over that configuration's cache, scored
    as the workload scores them (common word prefix with the full cache's answer).

    python -m kvcli.benchmarks.profile_calibration --docs 6 --out calibration.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time

from kvcli.benchmarks.serve_workload import agreement, documents
from kvcli.documents import load_document
from kvcli.serve.manager import DEFAULT_CONFIGS
from kvcli.serve.profiling import PROBE_QUESTIONS, AgreementProfiler, greedy_answer, quantized_copy


def common_prefix(a, b) -> int:
    """How many leading items of a and b are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def token_agreement(profiler: AgreementProfiler, compressed, question_ids: list[int], answer: list[int]) -> tuple[float, float]:
    """(agreeing positions share: the profiler's metric, common prefix share) of one teacher-forced pass."""
    predicted = profiler.predicted(compressed, question_ids, answer)
    return sum(p == t for p, t in zip(predicted, answer)) / len(answer), common_prefix(predicted, answer) / len(answer)


def calibrate(model, docs, *, answer_tokens: int, user_tokens: int, progress=lambda line: None) -> list[dict]:
    """One row per (document, configuration): the profile now and before, and users' quality."""
    profiler = AgreementProfiler(model, DEFAULT_CONFIGS, answer_tokens=answer_tokens)
    configs = list(range(1, len(DEFAULT_CONFIGS)))
    rows = []
    for number, doc in enumerate(docs, 1):
        document = load_document("-", stdin=io.BytesIO(doc.text.encode()))
        reads = profiler.read_configs(document, configs, {})
        full = reads[("full", 1.0)]
        probes = []
        for question in profiler.probe_questions(document):
            ids = full.layout.question_part(question)
            answer = greedy_answer(model, full, ids, answer_tokens)
            if answer:
                probes.append((ids, answer))
        users = []
        for question in doc.questions:
            ids = full.layout.question_part(question.text)
            users.append((ids, model.tokenizer.decode(greedy_answer(model, full, ids, user_tokens), skip_special_tokens=True)))
        for index in configs:
            config = DEFAULT_CONFIGS[index]
            compressed = quantized_copy(reads[(config.method, config.ratio)], config.kv_dtype)
            measured = [token_agreement(profiler, compressed, ids, answer) for ids, answer in probes]
            before = measured[: len(PROBE_QUESTIONS) + 1]  # the server's probes before: generic + the opening
            answers = [model.tokenizer.decode(greedy_answer(model, compressed, ids, user_tokens), skip_special_tokens=True) for ids, _ in users]
            rows.append({
                "document": doc.name, "config": config.name, "tokens": full.cache.original_length,
                "profile": statistics.fmean(m[0] for m in measured), "before": statistics.fmean(m[0] for m in before),
                "prefix": statistics.fmean(m[1] for m in measured),
                "users": statistics.fmean(agreement(a, ref) for a, (_, ref) in zip(answers, users)),
                "probes": [list(m) for m in measured],  # per probe: (agreeing positions, common prefix)
            })
        progress(f"document {number}/{len(docs)} ({full.cache.original_length} tokens) done")
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per configuration: mean profile (now, before) and users' quality, and each profile's
    mean absolute error against users' quality over documents."""
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        out.append({
            "config": name, "documents": len(mine),
            **{key: statistics.fmean(r[key] for r in mine) for key in ("profile", "before", "prefix", "users")},
            **{f"{key}_error": statistics.fmean(abs(r[key] - r["users"]) for r in mine) for key in ("profile", "before", "prefix")},
        })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--median-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--answer-tokens", type=int, default=12, help="the profiler's reference answers (the server's default)")
    parser.add_argument("--user-tokens", type=int, default=32, help="users' answers (the workload driver's default)")
    parser.add_argument("--out", help="write the rows and the summary as JSON")
    args = parser.parse_args(argv)

    from kvcli.models import load_model

    started = time.perf_counter()
    model = load_model("default", device=args.device)
    docs = documents(args.docs, args.median_tokens, args.max_tokens, args.seed)
    rows = calibrate(model, docs, answer_tokens=args.answer_tokens, user_tokens=args.user_tokens,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    table = summary(rows)
    print("| config | documents | profile | profile before | common prefix | users' needle questions | error: profile | error: before | error: prefix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['config']} | {r['documents']} | {r['profile']:.3f} | {r['before']:.3f} | {r['prefix']:.3f} | {r['users']:.3f} | "
              f"{r['profile_error']:.3f} | {r['before_error']:.3f} | {r['prefix_error']:.3f} |")
    print(f"{time.perf_counter() - started:.0f} s, device {model.device}", file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows, "summary": table}, handle, indent=1)


if __name__ == "__main__":
    main()
