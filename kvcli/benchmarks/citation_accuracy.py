"""How often the top cited page holds the answer, over the sample questions.

Every sample question has the page its answer is stated on (`page` in
samples/questions.jsonl; text files are one page). Each question is answered with
`cite=True` in the two ways kvcli answers: question-aware (`ask`'s default method) and
from one question-agnostic cache per document (`compress`'s default, what `.kvc` files,
`--reuse` and the server hold). Reported per mode: the top cited page is the answer's
page, on the correct answers and on all answers, for the documents with several pages
(the PDF) and for all documents (a one-page document is always cited right).

    python -m kvcli.benchmarks.citation_accuracy --ratio 0.25 --out citations.json
    python -m kvcli.benchmarks.citation_accuracy --overhead   # what --cite costs, same run

--overhead answers every question from the agnostic cache twice, without and with
`cite=True` (alternating, so load drifts hit both alike), and reports the time ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from kvcli import api
from kvcli.benchmarks.sample_quality import SAMPLES, correct, load_questions
from kvcli.compress.methods import default_method, make_press
from kvcli.documents import load_document
from kvcli.models import load_model


def rows_for(model, document, items: list[dict], ratio: float, generation: api.Generation) -> list[dict]:
    """One row per (question, mode): the answer, whether it is correct, the cited pages
    (each printed as it comes: a run on a loaded CPU takes a while)."""
    rows = []
    agnostic = api.read(model, document, make_press(default_method(agnostic=True), ratio=ratio), question=None)
    for item in items:
        aware = api.read(model, document, make_press(default_method(agnostic=False), ratio=ratio), question=item["question"])
        for mode, compressed in (("aware", aware), ("agnostic", agnostic)):
            (answer,) = api.answer(model, compressed, [item["question"]], generation, cite=True)
            cited = [c.page for c in answer.citations]
            rows.append({
                "document": document.name, "pages": document.num_pages, "question": item["question"], "mode": mode,
                "answer": answer.answer, "correct": correct(answer.answer, item["answers"]), "page": item["page"],
                "cited": cited, "top_right": bool(cited) and cited[0] == item["page"],
                "snippet": answer.citations[0].snippet if answer.citations else "",
            })
            print(show(rows[-1]), flush=True)
    return rows


def show(row: dict) -> str:
    mark = "ok  " if row["top_right"] else "MISS"
    verdict = "correct" if row["correct"] else "wrong  "
    return f"{mark} {row['mode']:<8} p.{row['page']} cited {row['cited']} {verdict} {row['question'][:50]!r} -> {row['answer'][:40]!r}"


def overhead(model, document, items: list[dict], ratio: float, generation: api.Generation) -> tuple[float, float]:
    """Seconds answering every question from one agnostic cache: (without, with citations)."""
    compressed = api.read(model, document, make_press(default_method(agnostic=True), ratio=ratio), question=None)
    plain = cited = 0.0
    for item in items:
        for cite in (False, True):
            started = time.perf_counter()
            api.answer(model, compressed, [item["question"]], generation, cite=cite)
            if cite:
                cited += time.perf_counter() - started
            else:
                plain += time.perf_counter() - started
    return plain, cited


def table(rows: list[dict]) -> list[str]:
    counts = defaultdict(lambda: [0, 0])
    for row in rows:
        for scope in ("all documents", "multi-page") if row["pages"] > 1 else ("all documents",):
            for answers in ("correct", "all") if row["correct"] else ("all",):
                counts[(row["mode"], scope, answers)][0] += row["top_right"]
                counts[(row["mode"], scope, answers)][1] += 1
    lines = ["| mode | documents | answers | top cited page holds the answer |", "|---|---|---|---|"]
    for (mode, scope, answers), (right, total) in sorted(counts.items()):
        lines.append(f"| {mode} | {scope} | {answers} | {right}/{total} ({right / total:.0%}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 matches the CPU numerics")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--documents", default="annual_report.pdf,field_notes.txt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    parser.add_argument("--overhead", action="store_true", help="time answers with and without citations instead")
    args = parser.parse_args()

    import torch

    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    generation = api.Generation(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    if args.overhead:
        for doc_name, items in load_questions(args.documents.split(",")).items():
            plain, cited = overhead(model, load_document(str(SAMPLES / doc_name)), items, args.ratio, generation)
            print(f"{doc_name}: {len(items)} answers {plain:.1f} s without citations, {cited:.1f} s with ({cited / plain:.2f}x)")
        return
    rows = []
    for doc_name, items in load_questions(args.documents.split(",")).items():
        rows += rows_for(model, load_document(str(SAMPLES / doc_name)), items, args.ratio, generation)
        print(f"{doc_name} done at {time.perf_counter() - started:.0f} s", flush=True)
    print("\n" + "\n".join(table(rows)))
    print(f"\n{time.perf_counter() - started:.0f} s, model {model.name} on {model.device} ({args.dtype}), ratio {args.ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
