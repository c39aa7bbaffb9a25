"""The tiered cache manager: utility, overflow resolution, decisions, restart (kvcli.serve.manager)."""

import math

import pytest

from kvcli.serve.manager import NOWHERE, CacheManager, CacheShape, Config, Entry, Tier
from tests.support import DOCUMENT, ask, tiny_service

SHAPE = CacheShape(num_layers=4, num_kv_heads=2, head_dim=64, compute_bytes=2)
CONFIGS = (Config("full", 1.0), Config("ada-snapkv", 0.5), Config("ada-snapkv", 0.25), Config("ada-snapkv", 0.25, "int8"))
MB = 1e6


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def manager(gpu=10 * MB, cpu=20 * MB, disk=1e9, alpha=0.5, profiler=None, cpu_bandwidth=1e9, disk_bandwidth=1e8):
    tiers = [Tier("gpu", int(gpu), math.inf), Tier("cpu", int(cpu), cpu_bandwidth), Tier("disk", int(disk), disk_bandwidth, encoded=True)]
    return CacheManager(tiers, SHAPE, configs=CONFIGS, alpha=alpha, prefill_seconds_per_token=1e-4, half_life=100.0,
                        clock=Clock(), profiler=profiler)


def sensitivity_profiler(sensitive: set[str]):
    """Sensitive documents lose a lot per compression step, the others almost nothing."""

    def profile(entry, configs):
        drop = 0.3 if entry.name in sensitive else 0.01
        return {i: 1.0 - drop * i for i in configs}

    return profile


def test_size_follows_kept_tokens_and_kv_dtype():
    m = manager()
    entry = Entry("a" * 32, "doc", doc_tokens=1000, prefix_tokens=10)
    row = 2 * 64 * 2 + 4  # K + V rows of bf16 and the int32 position
    assert m.size(entry, 0, "gpu") == 1010 * 4 * 2 * row
    assert m.size(entry, 2, "gpu") == 260 * 4 * 2 * row
    # int8 saves bytes only where caches are stored encoded (the disk tier)
    assert m.size(entry, 3, "gpu") == m.size(entry, 2, "gpu")
    assert m.size(entry, 3, "disk") < m.size(entry, 2, "disk")
    assert m.size(entry, 0, NOWHERE) == 0


def test_disk_size_counts_the_scores_files_of_compressed_configs_hold():
    """The server's .kvc files of compressed configurations carry one fp32 score per row
    (so they can be compressed further without a read); a full cache has none."""
    m = manager()
    entry = Entry("a" * 32, "doc", doc_tokens=1000, prefix_tokens=10)
    row = 2 * 64 * 2 + 4
    assert m.size(entry, 0, "disk") == 1010 * 4 * 2 * row
    assert m.size(entry, 2, "disk") == 260 * 4 * 2 * (row + 4)
    assert m.size(entry, 2, "gpu") == 260 * 4 * 2 * row  # in memory they are host-side, not counted


def test_utility_orders_tiers_configs_and_frequency():
    m = manager(profiler=sensitivity_profiler(set()))
    hot = m.add(Entry("a" * 32, "hot", doc_tokens=20_000))
    cold = m.add(Entry("b" * 32, "cold", doc_tokens=20_000))
    for _ in range(5):
        m.access(hot.id)
    m.access(cold.id)
    # faster tiers are worth more; being held nowhere is worth least
    values = [m.utility(hot, 0, t) for t in ("gpu", "cpu", "disk", NOWHERE)]
    assert values == sorted(values, reverse=True)
    # on the GPU (no load), lighter compression is worth more
    assert m.utility(hot, 0, "gpu") > m.utility(hot, 2, "gpu")
    # a frequently asked document is worth more than a rarely asked one in the same place
    assert m.utility(hot, 0, "gpu") > m.utility(cold, 0, "gpu")
    # frequency decays with the half-life
    before = m.frequency(hot)
    m.clock.now += 100.0
    assert m.frequency(hot) == pytest.approx(before / 2)


def test_overflow_resolution_fits_every_tier_and_logs_why():
    m = manager(gpu=4 * MB, cpu=8 * MB, disk=12 * MB, profiler=sensitivity_profiler(set()))
    ids = []
    for i in range(12):
        entry = m.add(Entry(f"{i:032x}", f"doc{i}", doc_tokens=1500))
        ids.append(entry.id)
        m.clock.now += 1
        m.access(entry.id)
        m.resolve()
    for tier in m.tiers:
        assert m.used(tier.name) <= tier.capacity, tier.name
    changes = [d for d in m.decisions if d.action in ("compress", "demote", "drop")]
    assert changes and all("over capacity" in d.reason for d in changes)
    listing = {row["id"]: row for row in m.listing()}
    assert set(listing) == set(ids)
    assert all({"tier", "config", "bytes", "utility", "reason"} <= set(row) for row in listing.values())
    # the most recent document is on the top tier
    assert listing[ids[-1]]["tier"] == "gpu"


def test_sensitive_documents_stay_lightly_compressed():
    sensitive = {f"doc{i}" for i in range(0, 8, 2)}
    # slow lower tiers: moving 3 MB down costs ~0.03-0.3 s of delay, more than a robust
    # document's quality step (0.01) and far less than a sensitive one's (0.3)
    m = manager(gpu=3 * MB, cpu=3 * MB, disk=1e9, profiler=sensitivity_profiler(sensitive), cpu_bandwidth=1e8, disk_bandwidth=1e7)
    for i in range(8):
        entry = m.add(Entry(f"{i:032x}", f"doc{i}", doc_tokens=1500))
        m.access(entry.id)
        m.resolve()
    by_name = {e.name: e for e in m.entries.values()}
    sensitive_steps = [by_name[n].config for n in sensitive]
    robust_steps = [e.config for n, e in by_name.items() if n not in sensitive]
    assert max(sensitive_steps) == 0  # demoted rather than compressed
    assert sum(robust_steps) > 0  # the robust ones absorbed the compression


def test_a_busy_model_weighs_delay_by_the_queue_it_makes():
    """With the model busy 90% of the time, every second a request holds it costs the ones
    queued behind it: delay weighs alpha / (1 - 0.9), and the same sensitive documents an
    idle server demotes (quality kept) are compressed instead (loads kept short)."""
    m = manager()
    assert m.delay_weight() == 0.5
    m.utilization = 0.8
    assert m.delay_weight() == pytest.approx(2.5)
    m.utilization = 1.0  # clamped: 10x at most
    assert m.delay_weight() == pytest.approx(5.0)

    def placed(utilization):
        m = manager(gpu=3 * MB, cpu=3 * MB, disk=1e9, profiler=sensitivity_profiler({f"doc{i}" for i in range(8)}), cpu_bandwidth=1e8, disk_bandwidth=1e7)
        m.utilization = utilization
        for i in range(8):
            entry = m.add(Entry(f"{i:032x}", f"doc{i}", doc_tokens=1500))
            m.access(entry.id)
            m.resolve()
        return [e.config for e in m.entries.values()]

    assert max(placed(0.0)) == 0  # idle: demoted, never compressed
    assert sum(placed(0.9)) > 0  # busy: compressed to load faster


def test_busy_lock_measures_the_share_of_time_it_is_held():
    from kvcli.serve.busy import BusyLock

    clock = Clock()
    lock = BusyLock(window=10.0, clock=clock)
    assert lock.utilization() == 0.0
    clock.now = 2.0
    with lock:
        clock.now = 3.0
        assert lock.utilization() == pytest.approx(1 / 3)  # held now: counted
    clock.now = 4.0
    assert lock.utilization() == pytest.approx(1 / 4)
    assert lock.acquire(blocking=False) and not lock.acquire(blocking=False)
    clock.now = 8.0
    lock.release()
    assert lock.utilization() == pytest.approx(5 / 8)
    clock.now = 20.0  # only the last 10 s count: both holdings are older
    assert lock.utilization() == 0.0


def test_alpha_zero_never_trades_quality_for_speed():
    m = manager(gpu=1 * MB, cpu=1 * MB, alpha=0.0, profiler=sensitivity_profiler(set()))
    for i in range(6):
        entry = m.add(Entry(f"{i:032x}", f"doc{i}", doc_tokens=1500))
        m.access(entry.id)
        m.resolve()
    # with delay worth nothing, compressing always loses quality and demoting loses nothing
    assert all(e.config == 0 for e in m.entries.values())
    assert m.used("gpu") <= 1 * MB


def test_unprofiled_entries_use_the_prior_and_text_free_entries_only_change_dtype():
    m = manager(gpu=0.5 * MB, cpu=0, disk=1e9)
    entry = m.add(Entry("c" * 32, "doc", doc_tokens=1500, recompressible=False))
    m.access(entry.id)
    assert m.quality(entry, 2) < m.quality(entry, 0)
    m.resolve()
    # without its text the ratio cannot change: it was demoted (kept whole), never re-read
    assert entry.config == 0 and entry.tier == "disk"


def test_access_promotes_and_drop_readmits_at_lightest():
    m = manager(profiler=sensitivity_profiler(set()))
    entry = m.add(Entry("d" * 32, "doc", doc_tokens=100))
    _, served_from, _ = m.access(entry.id)
    assert served_from == NOWHERE and entry.tier == "gpu" and entry.config == 0
    m._move(entry, 2, "disk", "demote", "test")
    _, served_from, config = m.access(entry.id)
    assert (served_from, config) == ("disk", 2) and entry.tier == "gpu" and entry.config == 2
    assert [d.action for d in m.decisions] == ["admit", "demote", "promote"]


# ---- the service on a tiny random model: restart keeps the disk tier ------------------------


def test_restart_rediscovers_and_reuses_the_disk_tier(char_tokenizer):
    from kvcli.store.persist import store_dir

    service = tiny_service(char_tokenizer)
    first = ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    assert first["placement"]["served_from"] == NOWHERE
    (entry,) = service.manager.entries.values()
    assert entry.tier == "disk"  # cpu capacity 0: demoted to the store
    files = list(store_dir().glob("*.kvc"))
    assert len(files) == 1

    restarted = tiny_service(char_tokenizer)
    assert restarted.rediscover() == 1
    (found,) = restarted.manager.entries.values()
    assert (found.id, found.tier, found.config) == (entry.id, "disk", entry.config)
    assert found.recompressible  # the text sidecar came back too
    again = ask(restarted, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    assert again["placement"]["served_from"] == "disk"
    assert again["answer"] == first["answer"]


def test_an_adopted_entry_without_its_text_is_compressed_by_selection(char_tokenizer):
    """A store file found at startup whose text sidecar is gone cannot be read again; with its
    rows' selection scores it can still be compressed further (KVzip's allocation is nested):
    the manager takes that step instead of dropping it, and no model pass is made."""
    from kvcli.serve.manager import DEFAULT_CONFIGS

    half = DEFAULT_CONFIGS.index(Config("kvzip", 0.5))
    quarter = DEFAULT_CONFIGS.index(Config("kvzip", 0.25))
    service = tiny_service(char_tokenizer)
    ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    (entry,) = service.manager.entries.values()
    service.manager._move(entry, half, "disk", "compress", "test: kvzip at 0.5")
    service.rebalance()
    assert service.disk[entry.id][0] == half
    service._sidecar(entry.id).unlink()  # the text is lost

    restarted = tiny_service(char_tokenizer)
    assert restarted.rediscover() == 1
    (found,) = restarted.manager.entries.values()
    assert not found.recompressible and found.config == half
    disk = restarted.manager.tier("disk")
    disk.capacity = restarted.manager.size(found, quarter, "disk") + 1  # room for a quarter, not a half
    restarted.rebalance()
    assert (found.config, found.tier) == (quarter, "disk")
    assert restarted.placement_work["derived"] == 1 and restarted.placement_work["read"] == 0
    (path,) = restarted.store.glob("*.kvc")
    assert restarted.disk[found.id] == (quarter, path)


def test_full_disk_drops_cleanly_and_keeps_answering(char_tokenizer, monkeypatch):
    from kvcli.errors import KvcliError
    from kvcli.serve import service as service_module

    def full(*args, **kwargs):
        raise KvcliError("cannot write x.kvc: disk full (123 bytes needed); free some space or choose another path")

    monkeypatch.setattr(service_module, "save_cache", full)
    service = tiny_service(char_tokenizer)
    result = ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    assert result["answer"] is not None
    (entry,) = service.manager.entries.values()
    assert entry.tier == NOWHERE
    assert any(d.action == "fail" and "disk full" in d.reason for d in service.manager.decisions)


def test_failed_rewrite_keeps_the_file_already_on_disk(char_tokenizer, monkeypatch):
    """A full disk while compressing further: the old file stays whole and the entry points at it."""
    from kvcli.errors import KvcliError
    from kvcli.serve import service as service_module

    service = tiny_service(char_tokenizer)
    ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    (entry,) = service.manager.entries.values()
    (before,) = service.store.glob("*.kvc")
    assert (entry.tier, entry.config) == ("disk", 0)

    def full(*args, **kwargs):
        raise KvcliError("cannot write x.kvc: disk full (123 bytes needed); free some space or choose another path")

    monkeypatch.setattr(service_module, "save_cache", full)
    service.manager._move(entry, 2, "disk", "compress", "test: compress further")
    service.rebalance()
    assert (entry.tier, entry.config) == ("disk", 0)
    assert list(service.store.glob("*.kvc")) == [before]
    assert "kept its file" in service.manager.decisions[-1].reason
    monkeypatch.undo()
    assert ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})["placement"]["served_from"] == "disk"


def test_files_stay_as_clean_copies_while_the_disk_has_room(char_tokenizer, monkeypatch):
    """Two documents taking turns in a memory tier that holds one: each swap demotes one and
    promotes the other. The promoted one's file is kept (the disk has room), so demoting it
    back costs no write; with room for one file only, the older copy goes."""
    from kvcli.serve import service as service_module

    service = tiny_service(char_tokenizer)
    ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    (first,) = service.manager.entries.values()
    one = service.manager.size(first, 0, "cpu")
    disk_one = service.manager.size(first, 0, "disk")
    service = tiny_service(char_tokenizer, cpu_bytes=int(one * 1.5))
    writes = []
    real_save = service_module.save_cache
    monkeypatch.setattr(service_module, "save_cache", lambda path, *a, **k: writes.append(path) or real_save(path, *a, **k))
    texts = [DOCUMENT, DOCUMENT.replace("counted", "weighed")]
    for turn in range(6):
        ask(service, {"text": texts[turn % 2], "question": "How many?", "max_new_tokens": 4})
    tiers = sorted(e.tier for e in service.manager.entries.values())
    assert tiers == ["cpu", "disk"]
    assert len(writes) == 2  # each document written once, when first demoted; every later swap is free
    assert len(list(service.store.glob("*.kvc"))) == 2  # the one in memory keeps its clean copy

    service.manager.tier("disk").capacity = int(disk_one * 1.5)  # room for one file: the clean copy goes
    service.rebalance()
    (left,) = service.store.glob("*.kvc")
    assert service.disk[next(e.id for e in service.manager.entries.values() if e.tier == "disk")][1] == left


def test_the_models_time_is_accounted_by_kind_once(char_tokenizer):
    """work_seconds says what a busy model is busy with: answering, placement, profiling;
    placement run inside a request counts as placement only, so the kinds add up to at most
    the time the calls took."""
    import time

    service = tiny_service(char_tokenizer)
    started = time.perf_counter()
    ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    wall = time.perf_counter() - started
    work = service.work_seconds
    assert work["requests"] > 0 and work["placement"] > 0 and work["profiling"] == 0  # profiling is off here
    assert sum(work.values()) <= wall


def test_clean_stop_writes_memory_to_disk_for_the_next_start(char_tokenizer):
    service = tiny_service(char_tokenizer, cpu_bytes=10**9)
    ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    (entry,) = service.manager.entries.values()
    assert entry.tier == "cpu" and not list(service.store.glob("*.kvc"))
    assert service.stop() == 1
    restarted = tiny_service(char_tokenizer, cpu_bytes=10**9)
    assert restarted.rediscover() == 1
    assert ask(restarted, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})["placement"]["served_from"] == "disk"


def test_a_damaged_file_is_read_again_from_the_text(char_tokenizer):
    service = tiny_service(char_tokenizer)
    first = ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    (path,) = service.store.glob("*.kvc")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the tensors: the checksum catches it on load
    path.write_bytes(bytes(data))
    again = ask(service, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    assert again["answer"] == first["answer"]
    (rewritten,) = service.store.glob("*.kvc")
    from kvcli.store.persist import load

    load(service.model, rewritten)  # whole again


KILL_MID_WRITE = """
import os, sys, time
sys.path.insert(0, {root!r})
os.environ["KVCLI_CACHE_DIR"] = {cache!r}
from kvcli.store import kvcfile as cachefile
from tests.support import DOCUMENT, CharTokenizer, tiny_service

service = tiny_service(CharTokenizer())
from kvcli.serve.requests import DocumentSource
entry = service.entry_for(service.read_document(DocumentSource(text=DOCUMENT)))
service.manager.access(entry.id)
service.rebalance()  # the document is on disk, whole

def stall(fileobj, data):  # write half, then hang until killed
    fileobj.write(data[: len(data) // 2])
    fileobj.flush()
    print("writing", flush=True)
    time.sleep(60)

cachefile._write_chunks = stall
service.manager._move(entry, 1, "disk", "compress", "test")
service.rebalance()
"""


def test_killed_mid_write_leaves_no_corrupt_cache_and_restarts(char_tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from kvcli.store.persist import load, store_dir

    root = str(Path(__file__).resolve().parents[1])
    script = KILL_MID_WRITE.format(root=root, cache=os.environ["KVCLI_CACHE_DIR"])
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=root)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert len(list(store_dir().glob(".*.tmp-*"))) == 1  # the half-written temp file, never under a .kvc name
    restarted = tiny_service(char_tokenizer)
    assert restarted.rediscover() == 1
    (entry,) = restarted.manager.entries.values()
    assert (entry.tier, entry.config) == ("disk", 0)  # the whole file from before the kill
    assert not list(store_dir().glob(".*.tmp-*"))  # its writer is dead: swept
    for path in store_dir().glob("*.kvc"):
        load(restarted.model, path)
    result = ask(restarted, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 4})
    assert result["placement"]["served_from"] == "disk"


def test_benchmark_compares_policies_on_one_stream(monkeypatch, capsys, tmp_path):
    """The workload script (not a timing): every policy replays the same stream on the same tiers."""
    import json
    import sys

    from kvcli.benchmarks import evicpress

    out = tmp_path / "evicpress.json"
    argv = ["evicpress", "--docs", "12", "--requests", "200", "--median-tokens", "800", "--prefill-seconds-per-token", "1e-3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    evicpress.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == [
        "lru-full", "compress@0.75", "compress@0.5", "compress@0.25", "compress@0.1", "joint(alpha=0.1)", "joint(alpha=0.5)", "joint(alpha=2)",
    ]
    assert all(sum(r["served_from"].values()) == pytest.approx(1.0) for r in rows)
    assert rows[0]["mean_quality"] == 1.0  # full caches agree with themselves
    first_reads = {r["served_from"].get(NOWHERE, 0) for r in rows}
    assert min(first_reads) >= 12 / 200  # every policy pays every document's first read
    assert "at equal quality" in capsys.readouterr().out


def test_frontier_interpolates_baselines_at_equal_quality():
    from kvcli.benchmarks.evicpress import frontier_ttft

    baselines = [{"mean_quality": 1.0, "mean_ttft_s": 10.0}, {"mean_quality": 0.9, "mean_ttft_s": 2.0}]
    assert frontier_ttft(baselines, 0.95) == pytest.approx(6.0)
    assert frontier_ttft(baselines, 0.8) == 2.0  # below every baseline: the fastest (all are better)
    assert frontier_ttft(baselines, 1.01) is None
