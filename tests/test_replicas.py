"""kvcli serve scaled out on Ray Serve (kvcli.serve.replicas): the hash ring, then two replicas
of a tiny model on a local Ray cluster: sticky routing, a shared saved cache, a replica killed
mid-request. Those three are skipped where Ray Serve is not installed (`pip install 'kvcli[ray]'`)."""

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from kvcli.errors import KvcliError
from kvcli.serve.routing import HashRing, document_key
from tests.support import text_of, tiny_loaded

ROOT = Path(__file__).resolve().parents[1]


def test_ring_moves_only_the_keys_of_a_removed_member():
    keys = [f"doc-{i}" for i in range(2000)]
    three = HashRing(["a", "b", "c"])
    two = HashRing(["a", "b"])
    before = {k: three.owner(k) for k in keys}
    after = {k: two.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "c" for k in moved)  # only c's keys move
    shares = [list(before.values()).count(m) / len(keys) for m in "abc"]
    assert min(shares) > 0.2  # virtual nodes spread the keys


def test_ring_is_the_same_in_every_process_and_order():
    assert [HashRing(["x", "y"]).owner(f"k{i}") for i in range(50)] == [HashRing(["y", "x"]).owner(f"k{i}") for i in range(50)]


def test_document_key_names_the_document():
    assert document_key({"document": "a.txt"}) == document_key({"document": os.path.abspath("a.txt")})
    assert document_key({"text": "one"}) != document_key({"text": "two"})
    with pytest.raises(KvcliError):
        document_key({"question": "q"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two replicas of the tiny model on a local Ray cluster (2 CPUs), one shared store, no
    memory tier (cpu 0 bytes): every cache lands in the shared store after its request."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'kvcli[ray]'")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'kvcli[ray]'")
    from kvcli.serve.replicas import build

    shared = tmp_path_factory.mktemp("shared-kvcli")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build(replicas=2, model=tiny_loaded, device="cpu", cache_dir=str(shared), capacities={"cpu": 0, "disk": 10**9},
                    policy="lru", cpus_per_replica=0.5, token="secret")
        handle = serve.run(app, name="kvcli-test", route_prefix="/")
        yield handle, shared, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(handle, text, **extra):
    return handle.ask.remote({"text": text, "question": "What is it about?", "max_new_tokens": 4, **extra}).result(timeout_s=300)


def documents(count):
    return [f"Document number {i}. " + text_of(300) for i in range(count)]


def test_each_document_stays_on_one_replica_and_reuses_its_cache(cluster):
    handle, _, _ = cluster
    docs = documents(12)
    first = [ask(handle, doc) for doc in docs]
    again = [ask(handle, doc) for doc in docs]
    assert all(a["replica"] == b["replica"] for a, b in zip(first, again))
    assert len({a["replica"] for a in first}) == 2  # both replicas own some (chance of not: 2 in 4096)
    assert {a["placement"]["served_from"] for a in first} == {"none"}
    assert {b["placement"]["served_from"] for b in again} == {"disk"}  # its own saved cache, where it was made


def test_a_replica_killed_mid_request_is_survived_and_its_saved_cache_loaded_elsewhere(cluster):
    handle, shared, _ = cluster
    doc = "The shared document. " + text_of(400)
    owner = ask(handle, doc)
    assert list((shared / "store").glob("*.kvc"))  # saved in the shared store
    long = {"questions": [f"Question {i}?" for i in range(32)], "max_new_tokens": 256}
    outcome = {}
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: outcome.update(ask(handle, doc, **long)))
    thread.start()
    time.sleep(2.0)  # the request is decoding on the owner
    os.kill(owner["pid"], signal.SIGKILL)
    thread.join(300)
    assert outcome, "the request did not come back"
    assert time.perf_counter() - started > 2.0
    assert outcome["pid"] != owner["pid"] and len(outcome["answers"]) == 32
    assert outcome["placement"]["served_from"] == "disk"  # the dead replica's file, loaded by the other one


def test_kvcli_clients_reach_the_replicas_over_http_with_the_token(cluster):
    from kvcli.serve.client import Client

    _, _, url = cluster
    body = {"text": "Over HTTP. " + text_of(200), "question": "What is it?", "max_new_tokens": 3}
    result = Client(url, token="secret", timeout=300).ask(body)  # what `kvcli ask --server URL` sends
    assert result["done"] and result["answers"][0]["answer"] == result["answer"] and result["replica"]
    with pytest.raises(KvcliError, match="wrong token"):
        Client(url, token="guess", timeout=60).ask(body)


def test_a_service_on_a_shared_store_loads_what_another_saved(char_tokenizer):
    from tests.support import ask as ask_service
    from tests.support import tiny_service

    first, second = tiny_service(char_tokenizer), tiny_service(char_tokenizer)  # one store (the test's cache dir), no memory tier
    first.shared_store = second.shared_store = True
    body = {"text": "A shared note. " + text_of(300), "question": "What is it?", "max_new_tokens": 3}
    made = ask_service(first, body)
    assert made["placement"]["served_from"] == "none" and first.disk
    loaded = ask_service(second, body)
    assert loaded["placement"]["served_from"] == "disk" and loaded["answer"] == made["answer"]
    alone = tiny_service(char_tokenizer)  # not shared: reads the text again, as a single server does
    assert ask_service(alone, body)["placement"]["served_from"] == "none"


def test_the_ray_entry_point_requires_a_token_and_known_options(monkeypatch):
    pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'kvcli[ray]'")
    from kvcli.serve.replicas import app

    monkeypatch.delenv("KVCLI_SERVER_TOKEN", raising=False)
    with pytest.raises(KvcliError, match="KVCLI_SERVER_TOKEN"):
        app({"replicas": "2"})
    monkeypatch.setenv("KVCLI_SERVER_TOKEN", "secret")
    with pytest.raises(KvcliError, match="unknown option.*replica_count"):
        app({"replica_count": "2"})
