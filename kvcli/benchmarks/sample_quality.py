"""Answers over the sample documents: how often compression keeps the full-cache answer.

For every sample question, the full-cache answer is the reference. Each method then
answers at each kept ratio, question-aware (the question is the observation window; one
prefill per question) and question-agnostic (one compression per document, all its
questions answered as one batch from that cache). Reported per (method, ratio, mode):
answers identical to the full-cache answer, and answers containing an expected answer.

    python -m kvcli.benchmarks.sample_quality --ratios 0.25,0.1 --out quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from kvcli import api
from kvcli.documents import load_document
from kvcli.compress.methods import METHODS, make_press
from kvcli.models import load_model

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def correct(answer: str, expected: list[str]) -> bool:
    return any(e.lower() in answer.lower() for e in expected)


def load_questions(documents: list[str] | None) -> dict[str, list[dict]]:
    by_doc = defaultdict(list)
    for line in (SAMPLES / "questions.jsonl").read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            if documents is None or item["document"] in documents:
                by_doc[item["document"]].append(item)
    return by_doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 matches the CPU numerics")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "full"))
    parser.add_argument("--ratios", default="0.25,0.1")
    parser.add_argument("--documents", default="annual_report.pdf,field_notes.txt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    generation = api.Generation(max_new_tokens=args.max_new_tokens)
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    started = time.perf_counter()
    for doc_name, items in load_questions(args.documents.split(",")).items():
        document = load_document(str(SAMPLES / doc_name))
        questions = [item["question"] for item in items]
        full = {}
        for item in items:
            answer, _ = api.ask(model, document, item["question"], press=make_press("full"), generation=generation)
            full[item["question"]] = answer.answer
            rows.append({"document": doc_name, "question": item["question"], "method": "full", "ratio": 1.0, "mode": "aware", "answer": answer.answer, "same_as_full": True, "correct": correct(answer.answer, item["answers"])})
        for method in methods:
            for ratio in ratios:
                press = make_press(method, ratio=ratio)
                compressed = api.read(model, document, press, question=None)
                for item, answer in zip(items, api.answer(model, compressed, questions, generation)):
                    rows.append({"document": doc_name, "question": item["question"], "method": method, "ratio": ratio, "mode": "agnostic", "answer": answer.answer, "same_as_full": normalize(answer.answer) == normalize(full[item["question"]]), "correct": correct(answer.answer, item["answers"])})
                for item in items:
                    answer, _ = api.ask(model, document, item["question"], press=make_press(method, ratio=ratio), generation=generation)
                    rows.append({"document": doc_name, "question": item["question"], "method": method, "ratio": ratio, "mode": "aware", "answer": answer.answer, "same_as_full": normalize(answer.answer) == normalize(full[item["question"]]), "correct": correct(answer.answer, item["answers"])})
                print(f"{doc_name} {method} {ratio} done at {time.perf_counter() - started:.0f} s", flush=True)
    table = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        key = (row["method"], row["ratio"], row["mode"])
        table[key][0] += row["same_as_full"]
        table[key][1] += row["correct"]
        table[key][2] += 1
    print("\n| method | ratio | mode | same as full | correct | questions |\n|---|---|---|---|---|---|")
    for (method, ratio, mode), (same, right, total) in sorted(table.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], -kv[0][1], kv[0][2])):
        print(f"| {method} | {ratio} | {mode} | {same}/{total} | {right}/{total} | {total} |")
    print(f"\n{time.perf_counter() - started:.0f} s, model {model.name} on {model.device} ({args.dtype})")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
