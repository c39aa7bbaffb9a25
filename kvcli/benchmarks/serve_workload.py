"""End to end through `kvcli serve`: the EVICPRESS workload as real concurrent requests.

kvcli.benchmarks.evicpress predicts each policy's time to first token from the cost model;
this driver measures it where a user does, on the client side of the HTTP API:

  - documents made by kvcli.eval.tasks (RULER's multi-key needles: four keys, each asked
    for by its own question, so every question has a known answer), more of them than the
    memory and disk tiers hold together (tier capacities are set as fractions of all full
    caches, so that is true at any scale);
  - Zipf popularity over documents, a question drawn per request among the document's,
    Poisson arrivals at --rate per second, sent concurrently;
  - per policy a fresh `kvcli serve` subprocess on the loopback address (port 0; the driver
    reads the URL and the token file from what the server prints), its own store, the same
    tiers: joint, lru (full caches, LMCache-style), lru at fixed ratios, compress-only;
  - the documents are first added through POST /compress (what the server does to a new
    document, profiling included, happens before the clock starts), then the timed
    questions; TTFT = from sending a request to its first streamed token arriving;
  - quality = agreement with the full cache's answer to the same (document, question),
    taken once from a server whose memory holds every full cache (common word prefix over
    the longer answer; `exact` and `correct` (the needle found) beside it);
  - the cost model (kvcli.serve.manager with the constants measured here, the documents'
    sizes and profiled qualities from the runs) replays the same ingest and question
    stream, so its predicted ratio sits beside the measured one.

Every loop is bounded: --requests questions at most, sent within --duration seconds, each
with a timeout; servers that do not start or stop in time are killed.

    python -m kvcli.benchmarks.serve_workload --docs 8 --requests 30 --rate 0.25 --out serve-workload.json    # this CPU
    python -m kvcli.benchmarks.serve_workload --device cuda --docs 16 --median-tokens 1500 --requests 100 --rate 5    # a GPU
    python -m kvcli.benchmarks.serve_workload --device cuda --model-config llama-8b --policies joint,lru-full,lru@0.25,compress-only ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvcli.benchmarks.evicpress import compare
from kvcli.errors import KvcliError
from kvcli.serve.manager import NOWHERE, CacheShape, Entry, Tier, make_manager
from kvcli.serve.token import read_token_file

NEEDLE = re.compile(r"special magic numbers for (\S+) is: (\d+)\. ")
START_TIMEOUT = 600.0  # seconds for a server to load its model and bind
STOP_TIMEOUT = 120.0  # seconds for it to write memory to disk and exit, then it is killed
CHARS_PER_TOKEN = 4  # sizing estimate for the generators (RULER's noise: ~4 characters a token)
SHAPES = {  # what one kept token costs in the servers' caches (kvcli.serve.service.ModelService.shape_of)
    ("default", "cpu"): CacheShape(30, 3, 64, 4),  # SmolLM2-135M, decoded in fp32 on CPU
    ("default", "cuda"): CacheShape(30, 3, 64, 2),  # bf16 on a GPU
    ("llama-8b", "cuda"): CacheShape(32, 8, 128, 2),
}


# ---- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class WorkDocument:
    name: str
    text: str
    questions: tuple[Question, ...]

    def write(self, folder: Path) -> str:
        """Saved as `folder/NAME.txt` (the server reads it by path, and names it so); returns the path."""
        path = folder / f"{self.name}.txt"
        path.write_text(self.text, encoding="utf-8")
        return str(path)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the timed phase
    document: int
    question: int


def documents(count: int, median_tokens: int, max_tokens: int, seed: int) -> list[WorkDocument]:
    """`count` multi-key needle documents, log-normal lengths; one question per needle."""
    from kvcli.eval.tasks import generate

    rng = random.Random(seed)
    made = []
    for index in range(count):
        length = int(min(max_tokens, max(384, rng.lognormvariate(math.log(median_tokens), 0.5))))
        sample = generate("niah_multikey", length=length, seed=seed, index=index,
                          prompt_tokens=lambda document, question: (len(document) + len(question)) // CHARS_PER_TOKEN)
        questions = tuple(
            Question(f"Some special magic numbers are hidden in the document. What is the special magic number for {key} "
                     "mentioned in the document? Answer with the number only.", (value,))
            for key, value in NEEDLE.findall(sample.context)
        )
        made.append(WorkDocument(f"needles-{index:04d}", sample.context, questions))
    return made


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Popularity of rank r: 1 / (r + 1) ** exponent, normalized."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


def arrivals(docs: list[WorkDocument], *, requests: int, rate: float, zipf: float, duration: float, rng: random.Random) -> list[Arrival]:
    """At most `requests` questions, Poisson at `rate`/s, within `duration` s; Zipf over
    documents (popularity independent of length), each question uniform among its document's."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    weights = zipf_weights(len(docs), zipf)
    stream, at = [], 0.0
    while len(stream) < requests:
        at += rng.expovariate(rate)
        if at > duration:
            break
        doc = rng.choices(order, weights=weights)[0]
        stream.append(Arrival(at, doc, rng.randrange(len(docs[doc].questions))))
    return stream


# ---- quality and the report's maths ------------------------------------------------------------


def agreement(answer: str, reference: str) -> float:
    """Common word prefix of the two answers over the longer one (1.0: the same answer)."""
    a, b = answer.split(), reference.split()
    if not a and not b:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(len(a), len(b))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(policy: str, results: list[dict], references: dict[tuple[int, int], str], docs: list[WorkDocument]) -> dict:
    """One row: client TTFT mean / p50 / p95, quality against the full cache, where requests were served from."""
    from kvcli.eval.tasks import match_all

    done = [r for r in results if "error" not in r]
    if not done:
        raise KvcliError(f"{policy}: no request succeeded ({results[0]['error'] if results else 'none sent'})")
    ttfts = [r["ttft_s"] for r in done]
    quality = [agreement(r["answer"], references[(r["document"], r["question"])]) for r in done]
    exact = [r["answer"].strip() == references[(r["document"], r["question"])].strip() for r in done]
    correct = [match_all(r["answer"], docs[r["document"]].questions[r["question"]].answers) for r in done]
    sources: dict[str, float] = {}
    for r in done:
        sources[r["served_from"]] = sources.get(r["served_from"], 0) + 1 / len(done)
    return {
        "policy": policy, "requests": len(results), "failed": len(results) - len(done),
        "mean_ttft_s": statistics.fmean(ttfts), "p50_ttft_s": percentile(ttfts, 0.5), "p95_ttft_s": percentile(ttfts, 0.95),
        "mean_server_ttft_s": statistics.fmean(r["server_ttft_s"] for r in done),
        "mean_quality": statistics.fmean(quality), "exact": statistics.fmean(exact), "correct": statistics.fmean(correct),
        "served_from": dict(sorted(sources.items())),
    }


# ---- one server, started as a user starts it ----------------------------------------------------


class ServerProcess:
    """`kvcli serve` in a subprocess with its own store (the model cache shared by a link).

    The URL and the token file are read from the lines the server prints at start; the
    rest of its stderr is drained (kept: the last lines explain a failure).
    """

    def __init__(self, command: list[str], home: Path, models: Path):
        (home / "run").mkdir(parents=True, mode=0o700)
        models.mkdir(parents=True, exist_ok=True)  # the first server to need the embedded model converts it there, once
        (home / "models").symlink_to(models, target_is_directory=True)
        env = {**os.environ, "KVCLI_CACHE_DIR": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "COLUMNS": "100000"}  # rich wraps the server's lines at the terminal's width: one line each, to be parsed
        env.pop("KVCLI_SERVER", None)
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self.token: str | None = None
        found = threading.Event()

        def drain():
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                del self.lines[:-200]
                token = re.search(r"token for clients: (\S+)", line)
                if token:
                    self.token = read_token_file(Path(token.group(1)))
                match = re.search(r" on (http://\S+) \(Ctrl-C", line)
                if match:
                    self.url = match.group(1)
                    found.set()
            found.set()  # it exited

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(START_TIMEOUT) or self.url is None:
            self.stop()
            raise KvcliError(f"the server did not start: {' | '.join(self.lines[-5:]) or 'no output'}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a clean stop, as Ctrl-C
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve_command(args, policy: str, ratio: float, capacities: dict[str, int]) -> list[str]:
    """How a policy's server is started: `kvcli serve`, or this module's random-weight 8B server."""
    sizes = [f"--{tier}-bytes={size}" for tier, size in capacities.items()]
    common = ["--port", "0", "--policy", policy, "--ratio", str(ratio), "--max-pending", str(args.concurrency + 4), *sizes]
    if args.model_config == "llama-8b":
        return [sys.executable, "-m", "kvcli.benchmarks.serve_workload", "--serve-random-8b", *common]
    return [sys.executable, "-m", "kvcli.cli.main", "serve", "--device", args.device, *common]


# ---- the client side ----------------------------------------------------------------------------


def ask(client, path: str, question: Question, max_new_tokens: int) -> dict:
    """One streamed question about the document at `path`; TTFT from sending it to its first token arriving here."""
    first: list[float] = []

    def on_token(index: int, text: str) -> None:
        if not first:
            first.append(time.perf_counter())

    sent = time.perf_counter()
    result = client.ask({"document": path, "question": question.text, "max_new_tokens": max_new_tokens, "temperature": 0.0}, on_token=on_token)
    done = time.perf_counter()
    (record,) = result["answers"]
    return {
        "ttft_s": (first[0] if first else done) - sent, "answer": record["answer"],
        "server_ttft_s": record["timings"]["ttft_seconds"], "served_from": result["placement"]["served_from"],
        "config": result["placement"].get("config"),
    }


def ingest(client, paths: list[str], settle_timeout: float = START_TIMEOUT) -> float:
    """Add every document (POST /compress: read, profiled, placed); returns the seconds it took,
    until the server has settled: a reply goes out before its profiling and placement run, so
    without the wait the last document's profiling would take the model from the first timed
    questions (it did: 2.4-2.9 s of the GPU run's questions went to it)."""
    started = time.perf_counter()
    for path in paths:
        client.compress({"document": path})
    deadline = time.monotonic() + settle_timeout
    while client.health()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.perf_counter() - started


def replay(client, docs: list[WorkDocument], paths: list[str], stream: list[Arrival], *, concurrency: int, max_new_tokens: int) -> tuple[list[dict], float]:
    """Send `stream` at its arrival times, at most `concurrency` in flight; returns (results, wall seconds)."""

    def one(arrival: Arrival) -> dict:
        base = {"document": arrival.document, "question": arrival.question, "at": arrival.at}
        try:
            return {**base, **ask(client, paths[arrival.document], docs[arrival.document].questions[arrival.question], max_new_tokens)}
        except KvcliError as exc:
            return {**base, "error": str(exc)}

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = []
        for arrival in stream:
            time.sleep(max(0.0, started + arrival.at - time.perf_counter()))
            futures.append(pool.submit(one, arrival))
        results = [f.result() for f in futures]  # each bounded by the client's timeout
    return results, time.perf_counter() - started


def references(client, docs: list[WorkDocument], paths: list[str], max_new_tokens: int) -> tuple[dict[tuple[int, int], str], list[float]]:
    """The full cache's answer to every (document, question), and the prefill seconds per token
    of each first read (the cost model's constant)."""
    answers, per_token = {}, []
    for d, doc in enumerate(docs):
        for q, question in enumerate(doc.questions):
            body = {"document": paths[d], "question": question.text, "max_new_tokens": max_new_tokens, "temperature": 0.0}
            result = client.ask(body)
            (record,) = result["answers"]
            answers[(d, q)] = record["answer"]
            if q == 0 and record["timings"]["prefill_seconds"] > 0:
                per_token.append(record["timings"]["prefill_seconds"] / record["document"]["tokens"])
    return answers, per_token


# ---- the cost model's prediction of the same run ---------------------------------------------------


def predict(policy: str, ratio: float, tiers: list[dict], shape: CacheShape, listing: list[dict], qualities: dict[str, dict],
            stream: list[Arrival], prefill: float) -> dict:
    """The cost model's TTFT and quality for `policy` on the same ingest and question stream.

    `listing`: the reference server's rows (document sizes, in document order); `qualities`:
    the joint server's profiled quality per entry id and configuration name (the policy and
    the score both use them: a perfect profiler).
    """
    clock = [0.0]
    model_tiers = [Tier(t["tier"], t["capacity"], t["bandwidth"] if t["bandwidth"] is not None else math.inf, t["tier"] == "disk") for t in tiers]
    manager = make_manager(policy, model_tiers, shape, ratio=ratio, prefill_seconds_per_token=prefill, clock=lambda: clock[0])
    names = [c.name for c in manager.configs]
    ids = []
    for row in listing:
        measured = qualities.get(row["id"], {})
        quality = {i: measured[n] for i, n in enumerate(names) if n in measured}
        manager.add(Entry(row["id"], row["document"], row["document_tokens"], row["prefix_tokens"], quality=quality, profiled=bool(quality)))
        ids.append(row["id"])
    for eid in ids:  # the ingest: every document read once, then placed
        manager.access(eid)
        manager.resolve()
    ttfts, quality = [], []
    for arrival in stream:
        clock[0] = arrival.at
        entry, tier, config = manager.access(ids[arrival.document])
        ttfts.append(manager.ttft(entry, config, tier))
        quality.append(manager.quality(entry, config if tier != NOWHERE else 0))
        manager.resolve()
    return {"mean_ttft_s": statistics.fmean(ttfts), "p95_ttft_s": percentile(ttfts, 0.95), "mean_quality": statistics.fmean(quality)}


# ---- main ----------------------------------------------------------------------------------------


def policy_label(policy: str, ratio: float) -> str:
    if policy == "lru":
        return "lru-full" if ratio == 1.0 else f"lru@{ratio:g}"
    return policy


def parse_policies(text: str) -> list[tuple[str, float]]:
    """'joint,lru-full,lru@0.5,compress-only' -> [(policy, ratio), ...] (`kvcli serve --policy/--ratio`)."""
    chosen = []
    for label in filter(None, (part.strip() for part in text.split(","))):
        if label in ("joint", "compress-only"):
            chosen.append((label, 1.0))
        elif label == "lru-full":
            chosen.append(("lru", 1.0))
        elif label.startswith("lru@"):
            try:
                ratio = float(label[4:])
            except ValueError:
                ratio = -1.0
            if not 0.0 < ratio < 1.0:
                raise KvcliError(f"--policies: {label}: the ratio after lru@ must be in (0, 1)")
            chosen.append(("lru", ratio))
        else:
            raise KvcliError(f"--policies: unknown {label!r}; use joint, lru-full, lru@RATIO, compress-only")
    if not any(policy == "joint" for policy, _ in chosen):
        raise KvcliError("--policies must include joint (the others are its baselines)")
    return chosen


def run(args) -> dict:
    from kvcli.models import cache_dir
    from kvcli.serve.client import Client

    rng = random.Random(args.seed)
    docs = documents(args.docs, args.median_tokens, args.max_tokens, args.seed)
    stream = arrivals(docs, requests=args.requests, rate=args.rate, zipf=args.zipf, duration=args.duration, rng=rng)
    shape = SHAPES[(args.model_config, "cuda" if args.device == "cuda" else "cpu")]
    models = cache_dir() / "models"
    work = Path(tempfile.mkdtemp(prefix="kvcli-workload-", dir=args.work_dir))
    (work / "documents").mkdir()
    paths = [doc.write(work / "documents") for doc in docs]
    timeout = args.request_timeout

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # a benchmark script, not library code: minutes pass

    huge = {"cpu": 1 << 40, "disk": 1 << 40} | ({"gpu": 1 << 40} if args.device == "cuda" else {})
    progress(f"{len(docs)} documents, {len(stream)} questions over {stream[-1].at if stream else 0:.0f} s; full-cache references ...")
    with ServerProcess(serve_command(args, "lru", 1.0, huge), work / "reference", models) as server:
        client = Client(server.url, timeout=timeout, token=server.token)
        answers, per_token = references(client, docs, paths, args.max_new_tokens)
        by_name = {r["document"]: r for r in client.caches()["caches"]}
        listing = [by_name[Path(path).name] for path in paths]  # in document order
    full_total = sum(r["bytes"] for r in listing)
    top = "gpu" if args.device == "cuda" else "cpu"
    capacities = {top: int(args.fast_fraction * full_total), "disk": int(args.disk_fraction * full_total)}
    if args.device == "cuda":
        capacities["cpu"] = int(args.cpu_fraction * full_total)
    if not per_token:
        raise KvcliError("the reference server reported no read times (prefill_seconds 0 for every first read): nothing to calibrate the cost model with")
    prefill = statistics.median(per_token)

    policies = sorted(parse_policies(args.policies), key=lambda p: p[0] != "joint")  # joint first: its profiles feed the cost model
    rows, served_tiers, qualities = [], None, {}
    for policy, ratio in policies:
        label = policy_label(policy, ratio)
        progress(f"{label}: ingest ...")
        with ServerProcess(serve_command(args, policy, ratio, capacities), work / label, models) as server:
            client = Client(server.url, timeout=timeout, token=server.token)
            ingest_s = ingest(client, paths)
            progress(f"{label}: ingest {ingest_s:.0f} s; {len(stream)} questions ...")
            earlier = client.decisions()
            before = earlier[-1]["at"] if earlier else -math.inf
            work_before = client.health().get("work_seconds", {})
            results, wall = replay(client, docs, paths, stream, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens)
            health = client.health()
            actions: dict[str, int] = {}
            for decision in client.decisions():  # the last 200: enough for the runs this sizes
                if decision["at"] > before:
                    actions[decision["action"]] = actions.get(decision["action"], 0) + 1
            if policy == "joint":
                served_tiers = health["tiers"]
                qualities = {r["id"]: r["qualities"] for r in client.caches()["caches"]}
        row = summarize(label, results, answers, docs)
        row.update({"ingest_s": ingest_s, "replay_wall_s": wall, "tiers": health["tiers"], "utilization": health.get("utilization"),
                    "work_seconds": {k: round(v - work_before.get(k, 0.0), 3) for k, v in health.get("work_seconds", {}).items()},
                    "ratio": ratio, "kind": policy, "actions": actions})
        rows.append(row)
        progress(f"{label}: mean TTFT {row['mean_ttft_s']:.3f} s, quality {row['mean_quality']:.3f}")
        if args.out:  # each policy's row as it finishes: a run stopped at a time limit keeps what it measured
            Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, indent=2))

    for row in rows:
        row["predicted"] = predict(row["kind"], row["ratio"], served_tiers, shape, listing, qualities, stream, prefill)
    setup = {
        "docs": len(docs), "questions": len(stream), "rate": args.rate, "zipf": args.zipf, "concurrency": args.concurrency,
        "document_tokens": [r["document_tokens"] for r in listing], "full_cache_bytes": full_total, "capacities": capacities,
        "prefill_seconds_per_token": prefill, "device": args.device, "model": args.model_config,
        "load_average": os.getloadavg(),
    }
    shutil.rmtree(work, ignore_errors=True)  # the servers' stores (a failed run leaves them, to look at)
    return {"setup": setup, "rows": rows}


def frontier(rows: list[dict]) -> list[dict]:
    """The baselines no other baseline beats on both quality and TTFT (equal quality is read
    off this frontier; a dominated baseline would make any policy look fast)."""
    return [b for b in rows if not any(o["mean_quality"] >= b["mean_quality"] and o["mean_ttft_s"] < b["mean_ttft_s"] for o in rows)]


def comparisons(report: dict) -> dict[str, list[str]]:
    """The joint policy against the baselines' frontier (kvcli.benchmarks.evicpress.compare), measured and predicted."""
    measured = [{"policy": r["policy"], "mean_ttft_s": r["mean_ttft_s"], "mean_quality": r["mean_quality"]} for r in report["rows"]]
    predicted = [{"policy": r["policy"], **r["predicted"]} for r in report["rows"]]
    out = {}
    for name, rows in (("measured", measured), ("cost model", predicted)):
        joint = [r for r in rows if r["policy"] == "joint"]
        out[name] = compare(joint + frontier([r for r in rows if r["policy"] != "joint"]))
    return out


def print_report(report: dict) -> None:
    setup = report["setup"]
    print(f"{setup['docs']} documents ({sum(setup['document_tokens']):,} tokens, full caches {setup['full_cache_bytes'] / 1e6:.1f} MB), "
          f"{setup['questions']} questions, Poisson {setup['rate']}/s, Zipf {setup['zipf']}, {setup['concurrency']} clients")
    print("tiers: " + ", ".join(f"{t['tier']} {t['capacity'] / 1e6:.1f} MB @ {(t['bandwidth'] or math.inf) / 1e9:.2f} GB/s" for t in report["rows"][0]["tiers"]))
    print(f"prefill {setup['prefill_seconds_per_token'] * 1e3:.3f} ms/token; load average {', '.join(f'{x:.1f}' for x in setup['load_average'])}\n")
    print("| policy | mean TTFT s | p50 | p95 | server TTFT s | quality | exact | correct | served from | ingest s | predicted TTFT s | predicted quality |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        served = ", ".join(f"{k} {v:.0%}" for k, v in r["served_from"].items())
        p = r["predicted"]
        print(f"| {r['policy']} | {r['mean_ttft_s']:.3f} | {r['p50_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} | {r['mean_server_ttft_s']:.3f} | "
              f"{r['mean_quality']:.3f} | {r['exact']:.2f} | {r['correct']:.2f} | {served} | {r['ingest_s']:.0f} | {p['mean_ttft_s']:.3f} | {p['mean_quality']:.3f} |")
    print()
    for name, lines in comparisons(report).items():
        print(f"{name}: " + "; ".join(lines))
    print("placement changes during the questions: " + "; ".join(
        f"{r['policy']} " + (", ".join(f"{k} {v}" for k, v in sorted(r["actions"].items())) or "none") for r in report["rows"] if "actions" in r))
    print("the model's time during the questions (s): " + "; ".join(
        f"{r['policy']} " + ", ".join(f"{k} {v:.1f}" for k, v in r["work_seconds"].items()) + f" (utilization {r['utilization']:.2f})"
        for r in report["rows"] if r.get("work_seconds")))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_random_8b(argv: list[str]) -> None:
    """A `kvcli serve` of a Llama-3.1-8B-shaped model with random bf16 weights (speed only),
    the embedded model's tokenizer: the same service and HTTP server, started without the CLI."""
    from kvcli.attention import install
    from kvcli.benchmarks.e2e import build_model
    from kvcli.models import LoadedModel, load_model
    from kvcli.serve.server import make_server, server_url
    from kvcli.serve.service import ModelService
    from kvcli.serve.tiers import machine_tiers
    from kvcli.store.persist import store_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--policy", default="joint")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--max-pending", type=int, default=8)
    for tier in ("gpu", "cpu", "disk"):
        parser.add_argument(f"--{tier}-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    tokenizer = load_model("default", device="cpu").tokenizer  # its ids all fall inside Llama-3's vocabulary
    weights = build_model()
    install(weights)  # attention through kvcli, as load_model does
    model = LoadedModel(weights, tokenizer, "llama-3.1-8b-random", "8b" * 32, torch.device("cuda"), torch.bfloat16, 131072, 0.0)
    tiers = machine_tiers(store_dir(), {"gpu": args.gpu_bytes, "cpu": args.cpu_bytes, "disk": args.disk_bytes})
    manager = make_manager(args.policy, tiers, ModelService.shape_of(model), ratio=args.ratio)
    service = ModelService(model, manager, max_pending=args.max_pending, profile=args.policy != "lru")
    server = make_server(service, host="127.0.0.1", port=args.port)
    print(f"token for clients: {server.token_file}", file=sys.stderr, flush=True)
    print(f"serving {model.name} on {server_url(server)} (Ctrl-C stops)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # the driver stops it as a user stops `kvcli serve`
    try:
        server.serve_forever()
    finally:
        server.server_close()
        service.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-random-8b"]:
        return serve_random_8b(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--median-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=80, help="at most this many timed questions")
    parser.add_argument("--duration", type=float, default=120.0, help="questions arrive within this many seconds")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (clients)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer budget (the embedded model needs ~20 tokens to reach a needle's number)")
    parser.add_argument("--fast-fraction", type=float, default=0.15, help="top (compute) tier, as a fraction of all full caches")
    parser.add_argument("--cpu-fraction", type=float, default=0.15, help="CPU tier with a GPU, as a fraction of all full caches")
    parser.add_argument("--disk-fraction", type=float, default=0.4, help="disk tier, as a fraction of all full caches")
    parser.add_argument("--policies", default="joint,lru-full,lru@0.5,lru@0.25,compress-only",
                        help="servers to compare: joint, lru-full, lru@RATIO (every cache at one kept ratio), compress-only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-config", choices=["default", "llama-8b"], default="default",
                        help="llama-8b: Llama-3.1-8B shapes, random weights (speed only; needs --device cuda)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", default=None, help="where the servers' stores go (default: the temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", default=None, help="print the tables of a saved --out file again (no run)")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        if saved.get("partial"):
            parser.exit(1, f"error: {args.report} is a run stopped before its end: its finished rows are in the file, no tables\n")
        return print_report(saved)
    if args.model_config == "llama-8b" and args.device != "cuda":
        parser.error("--model-config llama-8b needs --device cuda")
    try:
        report = run(args)
    except KvcliError as exc:
        parser.exit(1, f"error: {exc}\n")
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
