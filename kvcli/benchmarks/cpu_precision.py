"""Precision per phase on a CPU: what bfloat16 reading costs in fidelity, and what it saves.

Every candidate precision (default: `auto`, i.e. bfloat16 reading + float32 decoding on a
CPU with AMX / AVX-512 BF16) is compared with float32 for both phases, in one run:

  document top-1   the sample documents fed teacher-forced through the weights of each
                   reading precision (plain transformers forward): the fraction of
                   positions whose most likely next token is float32's, and the mean KL;
  answers          every sample question of annual_report.pdf and field_notes.txt, read
                   question-aware as `kvcli ask` does (default method and ratio) and
                   answered greedily: the same answer as float32 (case and spacing aside),
                   the expected answer found, and the teacher-forced top-1 agreement along
                   float32's answer (its stop token included);
  agnostic         the same questions answered as one batch from one question-agnostic
                   cache per document (the `kvcli compress` + `ask FILE` path);
  TTFT             `kvcli ask samples/annual_report.pdf ...` in fresh processes, float32 and
                   each candidate alternating: time to first token from the request (read +
                   question + first token) and from the process start;
  follow-up        `kvcli compress` the PDF, then `kvcli ask FILE.kvc ...` in a fresh
                   process: the wall-clock time to the first answer token.

    python -m kvcli.benchmarks.cpu_precision --out cpu_precision.json
    python -m kvcli.benchmarks.cpu_precision --limit 2 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvcli import api, generate
from kvcli.benchmarks.sample_quality import SAMPLES, correct, load_questions, normalize
from kvcli.compress.methods import default_method, make_press
from kvcli.documents import load_document
from kvcli.eval.fidelity import next_token_agreement
from kvcli.models import LoadedModel, load_model
from kvcli.precision import Precision

DOCUMENTS = ("annual_report.pdf", "field_notes.txt")
TTFT_QUESTION = "Who audited the accounts?"


# ---- fidelity ---------------------------------------------------------------------------


@torch.inference_mode()
def document_logits_agreement(reference: LoadedModel, candidate: LoadedModel, ids: list[int], chunk: int = 512) -> dict:
    """Teacher-forced next-token agreement over a whole document: float32 weights against the
    candidate's reading weights, same tokens, every position (logits made `chunk` at a time)."""
    tokens = torch.tensor([ids], device=reference.device)
    ref_hidden = reference.model.model(input_ids=tokens).last_hidden_state  # [1, N, H]
    agree, kl, steps = 0.0, 0.0, 0
    with candidate.reading() as reader:
        hidden = reader.model.model(input_ids=tokens).last_hidden_state
        for start in range(0, len(ids), chunk):
            a = reference.model.lm_head(ref_hidden[0, start : start + chunk]).float()
            b = reader.model.lm_head(hidden[0, start : start + chunk]).float()
            top1, mean_kl = next_token_agreement(a, b)
            agree += top1 * a.shape[0]
            kl += mean_kl * a.shape[0]
            steps += a.shape[0]
    return {"positions": steps, "top1": agree / steps, "kl": kl / steps}


@torch.inference_mode()
def answer_aware(model: LoadedModel, document, question: str, press_args: dict, max_new_tokens: int) -> dict:
    """`kvcli ask DOC QUESTION`: read question-aware in the reading precision, decode greedily in
    model.dtype (what api.answer does for an aware cache). Keeps the cache as it was before the
    answer, for teacher forcing."""
    started = time.perf_counter()
    with model.reading() as reader:
        compressed = api.read(reader, document, make_press(**press_args), question=question, headroom_tokens=max_new_tokens)
    read_seconds = time.perf_counter() - started
    cache = generate.in_dtype(compressed.cache, model.dtype)
    before = cache.clone()  # decoding appends to the cache
    first_at: list[float] = []
    (ids,) = generate.decode(
        model.model, cache, compressed.first_logits.unsqueeze(0), max_new_tokens=max_new_tokens, stop_ids=api.stop_ids(model),
        on_token=lambda b, token: first_at or first_at.append(time.perf_counter()),
    )
    finished = time.perf_counter()
    first = first_at[0] if first_at else finished
    return {
        "compressed": compressed, "before": before, "ids": ids, "stopped": len(ids) < max_new_tokens,
        "answer": model.tokenizer.decode(ids, skip_special_tokens=True).strip(), "read_seconds": read_seconds,
        "ttft_seconds": first - started, "decode_tokens_per_second": (len(ids) - 1) / (finished - first) if len(ids) > 1 and finished > first else 0.0,
    }


@torch.inference_mode()
def forced_logits(model: LoadedModel, compressed, cache_before, forced: list[int]) -> torch.Tensor:
    """Next-token logits [1 + len(forced), vocab]: after the question, then after each forced token."""
    first = compressed.first_logits.float().unsqueeze(0)
    if not forced:
        return first
    rest = generate.forward(model.model, cache_before.clone(), torch.tensor([forced], device=model.device), every_position=True)[0]
    return torch.cat([first, rest.float()])


def fidelity(models: dict[str, LoadedModel], candidates: list[str], args, log, results: dict, save) -> None:
    """Fills results["documents"], ["aware"], ["agnostic"], calling save() as rows come."""
    press_args = {"method": args.method or default_method(agnostic=False), "ratio": args.ratio}
    agnostic_args = {"method": args.method or default_method(agnostic=True), "ratio": args.ratio}
    reference = models["float32"]
    doc_rows, aware_rows, agnostic_rows = results["documents"], results["aware"], results["agnostic"]
    for doc_name, items in load_questions(list(DOCUMENTS)).items():
        items = items[: args.limit] if args.limit else items
        document = load_document(str(SAMPLES / doc_name))
        ids = reference.tokenizer(document.text, add_special_tokens=False)["input_ids"]
        for name in candidates:
            row = {"document": doc_name, "precision": name, **document_logits_agreement(reference, models[name], ids)}
            doc_rows.append(row)
            log(f"{doc_name}: document top-1 {name} vs float32 {row['top1']:.4f} over {row['positions']} positions")
        for item in items:
            question = item["question"]
            runs = {name: answer_aware(models[name], document, question, press_args, args.max_new_tokens) for name in ["float32", *candidates]}
            ref = runs["float32"]
            ref_ids = ref["ids"]
            steps = len(ref_ids) + int(ref["stopped"])
            ref_logits = forced_logits(reference, ref["compressed"], ref["before"], ref_ids[: steps - 1])
            for name in ["float32", *candidates]:
                run = runs[name]
                logits = ref_logits if name == "float32" else forced_logits(models[name], run["compressed"], run["before"], ref_ids[: steps - 1])
                top1, kl = next_token_agreement(ref_logits[:steps], logits[:steps])
                answer = run["answer"]
                aware_rows.append({
                    "document": doc_name, "question": question, "precision": name, "answer": answer,
                    "same_as_float32": normalize(answer) == normalize(ref["answer"]), "correct": correct(answer, item["answers"]),
                    "forced_top1": top1, "forced_kl": kl, "steps": steps, "read_seconds": run["read_seconds"],
                    "ttft_seconds": run["ttft_seconds"], "decode_tokens_per_second": run["decode_tokens_per_second"],
                })
            log(f"{doc_name}: {question!r} " + "; ".join(
                f"{r['precision']} {r['read_seconds']:.2f}s read, same={r['same_as_float32']}, top1={r['forced_top1']:.3f}"
                for r in aware_rows[-1 - len(candidates):]))
            save()
        # question-agnostic: one cache per document and precision, every question in one batch
        questions = [item["question"] for item in items]
        reference_answers = None
        for name in ["float32", *candidates]:
            model = models[name]
            with model.reading() as reader:
                compressed = api.read(reader, document, make_press(**agnostic_args), question=None)
            decoding = replace(compressed, cache=generate.in_dtype(compressed.cache, model.dtype))
            answers = [a.answer for a in api.answer(model, decoding, questions, api.Generation(max_new_tokens=args.max_new_tokens))]
            reference_answers = reference_answers or answers
            for item, answer, ref_answer in zip(items, answers, reference_answers):
                agnostic_rows.append({"document": doc_name, "question": item["question"], "precision": name, "answer": answer,
                                      "same_as_float32": normalize(answer) == normalize(ref_answer), "correct": correct(answer, item["answers"])})
        log(f"{doc_name}: agnostic batch done")
        save()


# ---- time to first token, as a user sees it (fresh processes) ---------------------------

# Not a --dtype value: auto's alternative, reading with the weights cast to bfloat16 (bfloat16
# hidden states) instead of under autocast; decoding float32. Measured in process only.
BF16_WEIGHTS = "bf16-weights"


def candidate_model(name: str) -> LoadedModel:
    if name == BF16_WEIGHTS:
        model = load_model("default", device="cpu", dtype="auto")
        return replace(model, precision=Precision("bfloat16", "float32", "weights cast to bfloat16 for reading"))
    return load_model("default", device="cpu", dtype=name)



def kvcli(args: list[str], env: dict) -> tuple[dict, float]:
    """Run the CLI in a fresh process; (its --json record, wall seconds of the whole process)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kvcli.cli.main", *args], capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"kvcli {' '.join(args)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout.splitlines()[-1]), wall


def ttft(candidates: list[str], args, log) -> list[dict]:
    env = {**os.environ}
    env.pop("KVCLI_DTYPE", None)
    pdf = str(SAMPLES / "annual_report.pdf")
    rows = []
    for repeat in range(args.repeats):
        for name in ["float32", *(c for c in candidates if c != BF16_WEIGHTS)]:
            method = ["--method", args.method] if args.method else []
            record, wall = kvcli(["ask", pdf, TTFT_QUESTION, "--json", "--max-new-tokens", "8", "--dtype", name, *method, "--ratio", str(args.ratio)], env)
            timings = record["timings"]
            rows.append({"precision": name, "repeat": repeat, "ttft_seconds": timings["ttft_seconds"], "prefill_seconds": timings["prefill_seconds"],
                         "wall_to_first_token_seconds": timings["wall_to_first_token_seconds"], "process_seconds": wall,
                         "answer": record["answer"], "read": record["precision"]["read"], "decode": record["precision"]["decode"]})
            log(f"TTFT {name} #{repeat}: {timings['ttft_seconds']:.2f} s (prefill {timings['prefill_seconds']:.2f} s), "
                f"{timings['wall_to_first_token_seconds']:.2f} s from process start")
    return rows


def follow_up(args, log) -> list[dict]:
    """`kvcli compress` the PDF once, then `kvcli ask FILE.kvc` in fresh processes."""
    env = {**os.environ}
    env.pop("KVCLI_DTYPE", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kvc = str(Path(tmp) / "annual_report.kvc")
        kvcli(["compress", str(SAMPLES / "annual_report.pdf"), "-o", kvc, "--json"], env)
        for repeat in range(args.repeats):
            record, wall = kvcli(["ask", kvc, TTFT_QUESTION, "--json", "--max-new-tokens", "24"], env)
            timings = record["timings"]
            rows.append({"repeat": repeat, "wall_to_first_token_seconds": timings["wall_to_first_token_seconds"], "ttft_seconds": timings["ttft_seconds"],
                         "model_load_seconds": timings["model_load_seconds"], "process_seconds": wall, "answer": record["answer"]})
            log(f"follow-up #{repeat}: first token {timings['wall_to_first_token_seconds']:.2f} s after start "
                f"(load {timings['model_load_seconds']:.2f} s, from the file {timings['ttft_seconds']:.2f} s); process {wall:.2f} s")
    return rows


# ---- report -----------------------------------------------------------------------------


def _median(rows, key):
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def report(candidates, doc_rows, aware_rows, agnostic_rows, ttft_rows, follow_rows) -> str:
    out = []
    if doc_rows:
        out += ["| document | reading precision | positions | top-1 vs float32 | mean KL |", "|---|---|---|---|---|"]
        out += [f"| {r['document']} | {r['precision']} | {r['positions']} | {r['top1']:.4f} | {r['kl']:.5f} |" for r in doc_rows]
        out.append("")
    if aware_rows:
        out += ["| precision | mode | same answer as float32 | correct | teacher-forced top-1 | median read s | median TTFT s | median decode tok/s |",
                "|---|---|---|---|---|---|---|---|"]
        for name in ["float32", *candidates]:
            rows = [r for r in aware_rows if r["precision"] == name]
            same = sum(r["same_as_float32"] for r in rows)
            right = sum(r["correct"] for r in rows)
            steps = sum(r["steps"] for r in rows)
            top1 = sum(r["forced_top1"] * r["steps"] for r in rows) / max(1, steps)
            out.append(f"| {name} | aware | {same}/{len(rows)} ({same / len(rows):.0%}) | {right}/{len(rows)} | {top1:.4f} | "
                       f"{_median(rows, 'read_seconds'):.2f} | {_median(rows, 'ttft_seconds'):.2f} | {_median(rows, 'decode_tokens_per_second'):.1f} |")
            rows = [r for r in agnostic_rows if r["precision"] == name]
            if rows:
                same = sum(r["same_as_float32"] for r in rows)
                right = sum(r["correct"] for r in rows)
                out.append(f"| {name} | agnostic | {same}/{len(rows)} ({same / len(rows):.0%}) | {right}/{len(rows)} | | | | |")
        out.append("")
    if ttft_rows:
        base = _median([r for r in ttft_rows if r["precision"] == "float32"], "ttft_seconds")
        out += ["| precision (read/decode) | runs | median TTFT s | median prefill s | median from process start s | TTFT vs float32 |", "|---|---|---|---|---|---|"]
        for name in ["float32", *(c for c in candidates if c != BF16_WEIGHTS)]:
            rows = [r for r in ttft_rows if r["precision"] == name]
            value = _median(rows, "ttft_seconds")
            out.append(f"| {name} ({rows[0]['read']}/{rows[0]['decode']}) | {len(rows)} | {value:.2f} | {_median(rows, 'prefill_seconds'):.2f} | "
                       f"{_median(rows, 'wall_to_first_token_seconds'):.2f} | {base / value:.2f}x lower |")
        out.append("")
    if follow_rows:
        out += ["| follow-up from a .kvc | runs | median first token after process start s | median model load s | median TTFT from the file s | median process s |",
                "|---|---|---|---|---|---|",
                f"| auto | {len(follow_rows)} | {_median(follow_rows, 'wall_to_first_token_seconds'):.2f} | {_median(follow_rows, 'model_load_seconds'):.2f} | "
                f"{_median(follow_rows, 'ttft_seconds'):.2f} | {_median(follow_rows, 'process_seconds'):.2f} |"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default=f"auto,{BF16_WEIGHTS}",
                        help=f"compared with float32 (comma-separated): auto, bfloat16, float16, {BF16_WEIGHTS} (bf16-cast weights reading, float32 decoding)")
    parser.add_argument("--method", default=None, help="default: the CLI's (question-aware and agnostic defaults differ)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None, help="questions per document (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per precision for TTFT and the follow-up")
    parser.add_argument("--skip", default="", help="sections to skip: fidelity, ttft, follow-up (comma-separated)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    candidates = [c for c in args.candidates.split(",") if c and c != "float32"]
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    results = {"args": vars(args), "documents": [], "aware": [], "agnostic": [], "ttft": [], "follow_up": []}

    def save() -> None:  # after every section: a long run stopped early keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    # Fresh processes first (the headline figures), then the long in-process fidelity run.
    if "ttft" not in skip:
        results["ttft"] = ttft(candidates, args, log)
        save()
    if "follow-up" not in skip:
        results["follow_up"] = follow_up(args, log)
        save()
    if "fidelity" not in skip:
        models = {"float32": load_model("default", device="cpu", dtype="float32")}
        for name in candidates:
            models[name] = candidate_model(name)
            log(f"{name}: read {models[name].precision.read}, decode {models[name].precision.decode} ({models[name].precision.why})")
        fidelity(models, candidates, args, log, results, save)
    print(report(candidates, results["documents"], results["aware"], results["agnostic"], results["ttft"], results["follow_up"]))
    print(f"\n{time.perf_counter() - started:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
