"""A document ~3x the context, answered end to end: progressive reading vs truncation.

samples/long_manual.txt (about 23K SmolLM2 tokens; the embedded model has 8,192
positions) with its nine questions in samples/questions.jsonl (three each early, middle
and late). Each question is answered:

  - progressive, question-aware: the manual read in chunks (kvcli.compress.progressive), the question
    observing every step, compressed with --method at --budget tokens per head;
  - progressive, agnostic: read once without the question, the nine questions answered
    as one batch from that cache;
  - truncated: the same model with a full (uncompressed) cache of only the part of the
    manual that fits in the context with the question and the answer;
  - truncated-compressed: that part, compressed question-aware with the same method and
    budget (like for like: the only difference is reading beyond the context).

A run prints one table of correct answers by location (an answer is correct when it
contains an expected string, as in sample_quality).

    python -m kvcli.benchmarks.longdoc_quality --device cpu --budget 2048
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from kvcli import api
from kvcli.benchmarks.sample_quality import SAMPLES, correct, load_questions
from kvcli.documents import Document, PageSpan, load_document
from kvcli.compress.methods import make_press
from kvcli.models import load_model
from kvcli.prompts import PromptLayout

DOCUMENT = "long_manual.txt"
LOCATIONS = ("early", "middle", "late")


def truncated(model, document: Document, question: str, answer_tokens: int) -> Document:
    """The longest prefix of the document that fits the context with the question and answer."""
    layout = PromptLayout.build(model.tokenizer, document.text, question)
    room = model.context_length - len(layout.all_ids) + len(layout.document_ids) - answer_tokens
    text = model.tokenizer.decode(layout.document_ids[: max(0, room - 8)], skip_special_tokens=True)
    return Document(name=document.name, text=text, sha256=document.sha256, pages=[PageSpan(1, 0, len(text))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: the device's (fp32 on CPU)")
    parser.add_argument("--method", default="ada-snapkv")
    parser.add_argument("--budget", type=int, default=2048, help="document tokens kept per KV head")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="progressive,agnostic,truncated")
    parser.add_argument("--out", default=None, help="write the per-question records as JSON")
    args = parser.parse_args()

    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = load_model(args.model, device=args.device, dtype=dtypes[args.dtype] if args.dtype else None)
    document = load_document(str(SAMPLES / DOCUMENT))
    questions = load_questions([DOCUMENT])[DOCUMENT]
    generation = api.Generation(max_new_tokens=args.max_new_tokens)
    press = make_press(args.method, budget=args.budget)
    modes = args.modes.split(",")
    records = []

    def record(mode, item, answer, seconds, info=None):
        ok = correct(answer, item["answers"])
        records.append({"mode": mode, "location": item["location"], "question": item["question"], "answer": answer, "correct": ok, "seconds": round(seconds, 1), **(info or {})})
        print(f"[{mode}] {item['location']:6} {'OK ' if ok else 'no '} {item['question']} -> {answer!r} ({seconds:.0f} s)", flush=True)

    if "progressive" in modes:
        for item in questions:
            started = time.perf_counter()
            result, compressed = api.ask(model, document, item["question"], press=press, generation=generation, chunk_size=args.chunk_size)
            record("progressive", item, result.answer, time.perf_counter() - started, {"plan": compressed.progressive})
    if "agnostic" in modes:
        started = time.perf_counter()
        compressed = api.read(model, document, press, question=None, chunk_size=args.chunk_size, headroom_tokens=args.max_new_tokens)
        answers = api.answer(model, compressed, [q["question"] for q in questions], generation)
        seconds = (time.perf_counter() - started) / len(questions)
        for item, result in zip(questions, answers):
            record("agnostic", item, result.answer, seconds, {"plan": compressed.progressive})
    if "truncated" in modes:
        for item in questions:
            started = time.perf_counter()
            part = truncated(model, document, item["question"], args.max_new_tokens)
            result, compressed = api.ask(model, part, item["question"], press=make_press("full"), generation=generation, chunk_size=args.chunk_size)
            assert compressed.progressive is None
            record("truncated", item, result.answer, time.perf_counter() - started, {"document_tokens": compressed.document_tokens})
    if "truncated-compressed" in modes:  # like for like: the same method and budget, on the part that fits
        for item in questions:
            started = time.perf_counter()
            part = truncated(model, document, item["question"], args.max_new_tokens)
            result, compressed = api.ask(model, part, item["question"], press=press, generation=generation, chunk_size=args.chunk_size)
            assert compressed.progressive is None
            record("truncated-compressed", item, result.answer, time.perf_counter() - started, {"document_tokens": compressed.document_tokens})

    table = defaultdict(lambda: defaultdict(int))
    for r in records:
        table[r["mode"]][r["location"]] += r["correct"]
        table[r["mode"]]["total"] += r["correct"]
    counts = {loc: sum(1 for q in questions if q["location"] == loc) for loc in LOCATIONS}
    print(f"\n{DOCUMENT}: {len(PromptLayout.build(model.tokenizer, document.text, None).document_ids)} tokens, context {model.context_length}; "
          f"{args.method} at budget {args.budget}/head, chunk {args.chunk_size}, {args.max_new_tokens} answer tokens")
    print("| mode | " + " | ".join(f"{loc} ({counts[loc]})" for loc in LOCATIONS) + f" | total ({len(questions)}) |")
    print("| --- " * (len(LOCATIONS) + 2) + "|")
    for mode in modes:
        print(f"| {mode} | " + " | ".join(str(table[mode][loc]) for loc in LOCATIONS) + f" | {table[mode]['total']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
