"""`kvcli serve` over loopback with a tiny random model: API, errors, load, disconnects (kvcli.serve.server)."""

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from kvcli.serve.client import Client
from kvcli.errors import KvcliError
from kvcli.serve.manager import NOWHERE
from kvcli.serve.profiling import AgreementProfiler
from kvcli.serve.server import check_loopback, make_server, server_url
from tests.test_manager import DOCUMENT, tiny_service


@pytest.fixture
def service(char_tokenizer):
    return tiny_service(char_tokenizer, cpu_bytes=10**8)


@pytest.fixture
def url(service):
    server = make_server(service, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server_url(server)
    server.shutdown()
    server.server_close()


def raw(url, method, path, body: bytes | None = None, headers=None):
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def ask_body(**extra):
    return {"text": DOCUMENT, "question": "Who counted?", "max_new_tokens": 6, **extra}


def test_health(url):
    health = Client(url).health()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert [t["tier"] for t in health["tiers"]] == ["cpu", "disk"]


def test_ask_streams_tokens_then_done_and_lists_the_cache(url):
    tokens = []
    result = Client(url).ask(ask_body(), on_token=lambda i, text: tokens.append(text))
    assert result["done"] and tokens
    assert "".join(tokens).strip() == result["answer"]
    assert result["timings"]["served_from"] == NOWHERE
    again = Client(url).ask(ask_body())
    assert again["timings"]["served_from"] == "cpu" and again["answer"] == result["answer"]
    (row,) = Client(url).caches()["caches"]
    assert row["tier"] == "cpu" and row["bytes"] > 0 and "utility" in row and row["config"].startswith("full")


def test_ask_without_streaming_returns_one_object(url):
    status, data = raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, reuse=False, method="snapkv", ratio=0.5)).encode())
    assert status == 200
    result = json.loads(data)
    assert result["done"] and isinstance(result["answer"], str) and result["cache"]["method"] == "snapkv"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be an object"),
        (json.dumps({"text": DOCUMENT}).encode(), 400, "question"),
        (json.dumps({"question": "q"}).encode(), 400, "exactly one of"),
        (json.dumps({"document": "/nonexistent/x.txt", "question": "q"}).encode(), 400, "x.txt"),
    ],
    ids=["bad-json", "not-object", "no-question", "no-document", "missing-file"],
)
def test_malformed_requests_get_400(url, body, status, fragment):
    code, data = raw(url, "POST", "/ask", body, {"Content-Type": "application/json"})
    assert code == status
    assert fragment in json.loads(data)["error"]


@pytest.mark.parametrize(
    "field, value",
    [("temperature", "hot"), ("max_new_tokens", "5"), ("max_new_tokens", True), ("seed", 1.5), ("stream", "yes"), ("reuse", 1), ("ratio", "half")],
)
def test_wrongly_typed_fields_get_400(url, field, value):
    code, data = raw(url, "POST", "/ask", json.dumps({**ask_body(reuse=False), field: value}).encode())
    assert code == 400 and f"'{field}' must be" in json.loads(data)["error"]


def test_body_without_length_or_too_large_gets_400(url):
    assert raw(url, "POST", "/ask", None)[0] == 400
    code, data = raw(url, "POST", "/ask", b"{}", {"Content-Length": str(1 << 40)})
    assert code == 400 and "too large" in json.loads(data)["error"]


def test_unknown_endpoint_and_id_are_404_traversal_is_400(url):
    assert raw(url, "GET", "/nope")[0] == 404
    code, data = raw(url, "DELETE", "/caches/abcdef0123")
    assert code == 404 and "no cache" in json.loads(data)["error"]
    for evil in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "abc/../../x", "ABCDEF"):
        code, data = raw(url, "DELETE", f"/caches/{evil}")
        assert code == 400 and "hexadecimal" in json.loads(data)["error"], evil
    with pytest.raises(KvcliError, match="hexadecimal"):
        Client(url).remove("../x")


def test_delete_removes_a_cache_and_clear_removes_all(url, service):
    Client(url).ask(ask_body())
    (entry_id,) = service.manager.entries
    assert Client(url).remove(entry_id[:8]) == [entry_id]
    assert Client(url).caches()["caches"] == []
    Client(url).ask(ask_body())
    Client(url).ask(ask_body(text="Another document entirely. " * 10))
    assert len(Client(url).clear()) == 2
    assert Client(url).caches()["caches"] == [] and not service.memory and not service.disk


def test_concurrent_clients_succeed_or_get_503(url, service):
    service.max_pending = 3
    statuses = []
    lock = threading.Lock()

    def worker(n):
        for _ in range(3):
            code, data = raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, question=f"Question {n}?")).encode())
            with lock:
                statuses.append((code, json.loads(data)))

    listings = []

    def lister():  # listing never waits for the model and never sees a half-applied move
        for _ in range(20):
            listings.append(raw(url, "GET", "/caches")[0])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)] + [threading.Thread(target=lister)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert listings == [200] * 20
    assert len(statuses) == 24
    assert {code for code, _ in statuses} <= {200, 503}
    assert any(code == 200 for code, _ in statuses)
    assert all("busy" in body["error"] for code, body in statuses if code == 503)
    wait_idle(service)
    assert len(service.manager.entries) == 1  # one document, however many clients asked


def test_client_disconnect_mid_stream_leaves_the_server_healthy(url, service):
    Client(url).ask(ask_body())  # the document is cached
    before = {k: (v[0], v[1]) for k, v in service.memory.items()}
    parts = urlsplit(url)
    body = json.dumps(ask_body(max_new_tokens=400)).encode()
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(b"POST /ask HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200" in sock.recv(64)  # the stream began
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with RST
    sock.close()
    assert Client(url).health()["status"] == "ok"
    result = Client(url).ask(ask_body())
    assert result["timings"]["served_from"] == "cpu"
    assert {k: (v[0], v[1]) for k, v in service.memory.items()} == before
    wait_idle(service)


def wait_idle(service, seconds=60.0):
    """The last handler leaves its turn just after the client has read its final event."""
    deadline = time.monotonic() + seconds
    while service.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.pending == 0


def test_non_loopback_bind_is_refused(service):
    with pytest.raises(KvcliError, match="--allow-remote"):
        make_server(service, host="0.0.0.0", port=0)
    with pytest.raises(KvcliError, match="not a loopback"):
        check_loopback("8.8.8.8")
    check_loopback("localhost")
    check_loopback("::1")


def test_unix_socket(service, tmp_path):
    path = tmp_path / "kvcli.sock"
    server = make_server(service, socket_path=str(path))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        client = Client(f"unix://{path}")
        assert client.health()["status"] == "ok"
        assert client.ask(ask_body())["done"]
    finally:
        server.shutdown()
        server.server_close()


def test_server_down_is_a_one_line_error():
    with pytest.raises(KvcliError, match="cannot reach"):
        Client("http://127.0.0.1:9").health()


def test_documents_are_profiled_after_their_first_answer(char_tokenizer):
    service = tiny_service(char_tokenizer, cpu_bytes=10**8)
    service.manager.profiler = AgreementProfiler(service, answer_tokens=3)
    server = make_server(service, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        Client(server_url(server)).ask(ask_body(question="Where is the lighthouse?"))
        wait_idle(service)
        (entry,) = service.manager.entries.values()
        assert entry.profiled and set(entry.quality) == set(range(len(service.manager.configs)))
        (row,) = Client(server_url(server)).caches()["caches"]
        assert row["profiled"] and row["quality"] == entry.quality[entry.config]
        # the users' questions are probes of the next (idle) profile
        assert "Where is the lighthouse?" in service.manager.profiler.questions(entry, service.documents[entry.id])
    finally:
        server.shutdown()
        server.server_close()


def test_idle_profiling_waits_for_idleness_then_follows_new_questions(service):
    service.manager.profiler = AgreementProfiler(service, answer_tokens=3)
    with service.turn():
        service.ask(ask_body(), None)
    assert service.profile_idle(idle_seconds=60) is None  # someone just asked
    (entry,) = service.manager.entries.values()
    assert service.profile_idle(idle_seconds=0) == entry.id and entry.profiled
    assert service.profile_idle(idle_seconds=0) is None  # nothing new since


def test_agreement_profiler_measures_every_config(service):
    entry = service.entry_for(service.document({"text": DOCUMENT}))
    quality = AgreementProfiler(service, answer_tokens=4)(entry, list(range(len(service.manager.configs))))
    assert set(quality) == set(range(len(service.manager.configs)))
    assert quality[0] == 1.0  # the full cache agrees with itself
    assert all(0.0 <= q <= 1.0 for q in quality.values())
