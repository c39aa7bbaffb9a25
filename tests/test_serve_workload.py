"""The end-to-end workload driver (kvcli.benchmarks.serve_workload) at tiny scale: workload,
report maths, the cost model's replay, the server process it starts, and a short run of real
concurrent requests against a tiny server."""

import itertools
import json
import random
import sys
from pathlib import Path

import pytest

from kvcli.benchmarks import serve_workload as workload
from kvcli.errors import KvcliError
from kvcli.serve.client import Client
from kvcli.serve.manager import CacheShape


def test_zipf_weights_fall_as_a_power_of_rank():
    weights = workload.zipf_weights(10, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[0] / weights[9] == pytest.approx(10.0)


def test_documents_have_one_answerable_question_per_needle():
    docs = workload.documents(3, 500, 800, seed=1)
    assert len({d.text for d in docs}) == 3
    for doc in docs:
        assert len(doc.questions) == 4
        assert len({q.text for q in doc.questions}) == 4
        for question in doc.questions:
            (answer,) = question.answers
            assert answer in doc.text and answer not in question.text
        assert len(doc.text) // workload.CHARS_PER_TOKEN <= 800


def test_arrivals_are_poisson_zipf_and_bounded():
    docs = workload.documents(5, 400, 400, seed=0)
    many = workload.arrivals(docs, requests=4000, rate=10.0, zipf=1.2, duration=1e9, rng=random.Random(0))
    gaps = [b.at - a.at for a, b in itertools.pairwise(many)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    counts = sorted((sum(a.document == d for a in many) for d in range(5)), reverse=True)
    assert counts[0] / counts[1] == pytest.approx(2**1.2, rel=0.15)
    assert {a.question for a in many} == {0, 1, 2, 3}
    assert len(workload.arrivals(docs, requests=7, rate=10.0, zipf=1.0, duration=1e9, rng=random.Random(0))) == 7
    assert all(a.at <= 2.0 for a in workload.arrivals(docs, requests=10**6, rate=10.0, zipf=1.0, duration=2.0, rng=random.Random(0)))


def test_agreement_and_percentile():
    assert workload.agreement("1234 is it", "1234 is it") == 1.0
    assert workload.agreement("1234 is", "1234 was here") == pytest.approx(1 / 3)
    assert workload.agreement("", "") == 1.0 and workload.agreement("x", "") == 0.0
    values = [float(i) for i in range(1, 101)]
    assert workload.percentile(values, 0.5) == 50.0 and workload.percentile(values, 0.95) == 95.0
    assert workload.percentile([3.0], 0.95) == 3.0


def test_summarize_scores_against_the_full_cache_and_the_known_answer():
    docs = [workload.WorkDocument("d", "text", (workload.Question("q0", ("42",)), workload.Question("q1", ("7",))))]
    references = {(0, 0): "42", (0, 1): "7 it is"}
    results = [
        {"document": 0, "question": 0, "ttft_s": 1.0, "answer": "42", "server_ttft_s": 0.5, "served_from": "cpu"},
        {"document": 0, "question": 1, "ttft_s": 3.0, "answer": "8 it is", "server_ttft_s": 2.5, "served_from": "disk"},
        {"document": 0, "question": 1, "error": "server busy"},
    ]
    row = workload.summarize("joint", results, references, docs)
    assert row["requests"] == 3 and row["failed"] == 1
    assert row["mean_ttft_s"] == 2.0 and row["p50_ttft_s"] == 1.0 and row["p95_ttft_s"] == 3.0
    assert row["mean_quality"] == 0.5 and row["exact"] == 0.5 and row["correct"] == 0.5
    assert row["served_from"] == {"cpu": 0.5, "disk": 0.5}
    with pytest.raises(KvcliError, match="no request succeeded"):
        workload.summarize("joint", results[2:], references, docs)


def test_the_cost_model_replays_the_stream_on_the_measured_tiers():
    shape = CacheShape(2, 1, 32, 4)
    listing = [{"id": f"{i:032x}", "document": f"d{i}", "document_tokens": 1000, "prefix_tokens": 10} for i in range(4)]
    stream = [workload.Arrival(float(t), t % 4, 0) for t in range(40)]
    prefill = 1e-3

    def tiers(memory):  # memory only (null bandwidth: JSON's infinity, the compute tier)
        return [{"tier": "cpu", "capacity": memory, "bandwidth": None}]

    everything = workload.predict("lru", 1.0, tiers(10**9), shape, listing, {}, stream, prefill)
    assert everything["mean_ttft_s"] == pytest.approx(32 * prefill)  # held in memory: the question only
    nothing = workload.predict("lru", 1.0, tiers(0), shape, listing, {}, stream, prefill)
    assert nothing["mean_ttft_s"] == pytest.approx((1010 + 32) * prefill)  # read again every time
    quality = {row["id"]: {"full@1/auto": 1.0, "kvzip@0.5/auto": 0.9, "kvzip@0.25/auto": 0.8, "kvzip@0.1/auto": 0.5} for row in listing}
    joint = workload.predict("joint", 1.0, tiers(2 * 1010 * shape.bytes_per_token("auto", False)), shape, listing, quality, stream, prefill)
    assert joint["mean_ttft_s"] < nothing["mean_ttft_s"] and 0.5 <= joint["mean_quality"] < 1.0  # it compressed to keep all four


def test_server_process_reads_the_url_and_fails_plainly(tmp_path):
    fake = ("import sys, time; print('token for clients: /nonexistent/token', file=sys.stderr); "
            "print('serving tiny on http://127.0.0.1:9 (Ctrl-C stops)', file=sys.stderr, flush=True); time.sleep(60)")
    with workload.ServerProcess([sys.executable, "-c", fake], tmp_path / "a", tmp_path / "no-models") as server:
        assert server.url == "http://127.0.0.1:9" and server.token is None
    assert server.process.returncode is not None  # stopped on leaving
    with pytest.raises(KvcliError, match="did not start: boom"):
        workload.ServerProcess([sys.executable, "-c", "import sys; print('boom', file=sys.stderr)"], tmp_path / "b", tmp_path / "no-models")


def test_a_short_run_of_concurrent_requests_against_a_tiny_server(url, tmp_path):
    docs = workload.documents(3, 400, 400, seed=0)
    paths = [doc.write(tmp_path) for doc in docs]
    client = Client(url, timeout=120)
    stream = workload.arrivals(docs, requests=6, rate=20.0, zipf=1.0, duration=5.0, rng=random.Random(0))
    results, wall = workload.replay(client, docs, paths, stream, concurrency=3, max_new_tokens=2)
    assert len(results) == 6 and not [r for r in results if "error" in r]
    assert all(r["ttft_s"] > 0 and isinstance(r["answer"], str) for r in results)
    assert {r["served_from"] for r in results} <= {"none", "cpu", "disk"}
    assert wall >= stream[-1].at  # sent at their arrival times
    answers, per_token = workload.references(client, docs[:1], paths[:1], max_new_tokens=2)
    assert set(answers) == {(0, q) for q in range(4)} and all(p > 0 for p in per_token)
    assert Path(paths[0]).name in {row["document"] for row in client.caches()["caches"]}


# ---- the policies the driver compares (kvcli.serve.manager, `kvcli serve --policy`) ----------


def _entries(manager, count, tokens=1000):
    from kvcli.serve.manager import Entry

    for i in range(count):
        manager.add(Entry(f"{i:032x}", f"d{i}", tokens, 0, quality={0: 1.0, 1: 0.99, 2: 0.98, 3: 0.97, 4: 0.9, 5: 0.8}, profiled=True))
    return [f"{i:032x}" for i in range(count)]


def test_lru_demotes_the_least_recently_used_and_never_compresses():
    from kvcli.serve.manager import LRUManager, Tier, make_manager

    shape = CacheShape(1, 1, 32, 4)
    per_doc = 1000 * shape.bytes_per_token("auto", False)
    clock = [0.0]
    manager = make_manager("lru", [Tier("cpu", 2 * per_doc, float("inf")), Tier("disk", per_doc, 1e9, True)], shape, clock=lambda: clock[0])
    assert isinstance(manager, LRUManager) and [c.name for c in manager.configs] == ["full@1/auto"]
    ids = _entries(manager, 4)
    for t, eid in enumerate(ids):
        clock[0] = float(t)
        manager.access(eid)
        manager.resolve()
    assert [manager.entries[e].tier for e in ids] == ["none", "disk", "cpu", "cpu"]
    assert make_manager("lru", manager.tiers, shape, ratio=0.25).configs[0].name == "kvzip@0.25/auto"
    with pytest.raises(ValueError):
        make_manager("lru", manager.tiers, shape, ratio=0.0)
    with pytest.raises(ValueError, match="unknown policy"):
        make_manager("fifo", manager.tiers, shape)


def test_compress_only_compresses_or_drops_but_never_demotes():
    from kvcli.serve.manager import NOWHERE, Tier, make_manager

    shape = CacheShape(1, 1, 32, 4)
    per_doc = 1000 * shape.bytes_per_token("auto", False)
    tiers = [Tier("cpu", per_doc, float("inf")), Tier("disk", 100 * per_doc, 1e9, True)]
    for policy, disk_used in (("compress-only", False), ("joint", True)):
        manager = make_manager(policy, tiers, shape, prefill_seconds_per_token=1e-2)
        for eid in _entries(manager, 4):
            manager.access(eid)
            manager.resolve()
        placed = {e.tier for e in manager.entries.values()}
        assert ("disk" in placed) == disk_used
        if not disk_used:
            assert placed <= {"cpu", NOWHERE} and any(e.config > 0 for e in manager.entries.values())


def test_serve_refuses_an_unknown_policy_before_loading_the_model():
    from tests.support import run_kvcli

    result = run_kvcli(["serve", "--policy", "fifo"], timeout=120)
    assert result.returncode != 0 and "--policy 'fifo'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_policies_parse_to_server_options():
    assert workload.parse_policies("joint, lru-full,lru@0.25,compress-only") == [("joint", 1.0), ("lru", 1.0), ("lru", 0.25), ("compress-only", 1.0)]
    for bad, message in (("lru-full", "must include joint"), ("joint,lru@1.5", "in \\(0, 1\\)"), ("joint,lru@x", "in \\(0, 1\\)"), ("joint,fifo", "unknown 'fifo'")):
        with pytest.raises(KvcliError, match=message):
            workload.parse_policies(bad)


def test_equal_quality_is_read_off_the_baselines_frontier():
    def row(policy, ttft, quality, predicted_ttft):
        return {"policy": policy, "mean_ttft_s": ttft, "mean_quality": quality, "predicted": {"mean_ttft_s": predicted_ttft, "mean_quality": quality}}

    rows = [row("joint", 2.0, 0.8, 1.0), row("lru@0.25", 2.0, 0.7, 1.0), row("lru@0.5", 4.0, 0.9, 4.0), row("compress-only", 30.0, 0.85, 30.0)]
    assert [r["policy"] for r in workload.frontier(rows[1:])] == ["lru@0.25", "lru@0.5"]  # compress-only is beaten on both
    lines = workload.comparisons({"rows": rows})
    assert "1.50x at equal quality" in lines["measured"][0]  # 3.0 s interpolated half way, against 2.0 s
    assert "2.50x at equal quality" in lines["cost model"][0]


def test_report_of_a_run_stopped_before_its_end_says_so(tmp_path, capsys):
    """A run killed at a time limit leaves the rows it finished (written after each policy);
    --report on it is a one-line error, not a KeyError."""
    saved = tmp_path / "partial.json"
    saved.write_text(json.dumps({"partial": True, "rows": [{"policy": "joint", "mean_ttft_s": 2.0, "mean_quality": 0.9}]}))
    with pytest.raises(SystemExit) as exit_:
        workload.main(["--report", str(saved)])
    assert exit_.value.code == 1
    assert "stopped before its end" in capsys.readouterr().err


def test_ingest_waits_until_the_server_has_settled():
    """A reply goes out before its profiling runs: the timed questions start only once the
    server holds no request (GET /health pending 0), or the last document's profiling takes
    the model from the first of them."""
    from kvcli.benchmarks.serve_workload import ingest

    class SettlingClient:
        def __init__(self):
            self.added, self.pending = [], [2, 1, 1, 0, 0]

        def compress(self, body):
            self.added.append(body["document"])

        def health(self):
            return {"pending": self.pending.pop(0)}

    client = SettlingClient()
    ingest(client, ["a.txt", "b.txt"])
    assert client.added == ["a.txt", "b.txt"] and client.pending == [0]
