"""`kvcli serve` over loopback with a tiny random model: API, errors, load, disconnects (kvcli.serve.server).

The security items of issue 14 (token, Host/Origin, content type, bounded requests, valid
JSON out, streams that end on time, bounded threads) are in tests/test_serve_security.py.
"""

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from kvcli.errors import KvcliError
from kvcli.serve.client import Client
from kvcli.serve.manager import NOWHERE
from kvcli.serve.requests import DocumentSource
from kvcli.serve.server import check_loopback, make_server
from tests.support import DOCUMENT, ask, ask_body, raw, start, wait_idle


def test_health(url):
    health = Client(url).health()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert [t["tier"] for t in health["tiers"]] == ["cpu", "disk"]


def test_ask_streams_tokens_then_done_and_lists_the_cache(url):
    tokens = []
    result = Client(url).ask(ask_body(), on_token=lambda i, text: tokens.append(text))
    assert result["done"] and tokens
    assert "".join(tokens).strip() == result["answer"]
    assert result["placement"]["served_from"] == NOWHERE
    again = Client(url).ask(ask_body())
    assert again["placement"]["served_from"] == "cpu" and again["answer"] == result["answer"]
    (row,) = Client(url).caches()["caches"]
    assert row["tier"] == "cpu" and row["bytes"] > 0 and "utility" in row and row["config"].startswith("full")


def test_ask_without_streaming_returns_one_object(url):
    status, data = raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, reuse=False, method="snapkv", ratio=0.5)).encode())
    assert status == 200
    result = json.loads(data)
    assert result["done"] and isinstance(result["answer"], str)
    (record,) = result["answers"]
    assert record["answer"] == result["answer"] and record["cache"]["method"] == "snapkv"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be an object"),
        (b"", 400, "JSON object body is required"),
        (b"[" * 100_000, 400, "nested too deeply"),
        (json.dumps({"text": DOCUMENT}).encode(), 400, "question"),
        (json.dumps({"question": "q"}).encode(), 400, "exactly one of"),
        (json.dumps({"document": "/nonexistent/x.txt", "question": "q"}).encode(), 400, "x.txt"),
        (json.dumps({"document": "/nonexistent/x.kvc", "question": "q"}).encode(), 400, "x.kvc"),
    ],
    ids=["bad-json", "not-object", "empty", "nested-100000-deep", "no-question", "no-document", "missing-file", "missing-cache-file"],
)
def test_malformed_requests_get_400(url, body, status, fragment):
    code, data = raw(url, "POST", "/ask", body)
    assert code == status
    assert fragment in json.loads(data)["error"]


@pytest.mark.parametrize(
    "field, value",
    [("temperature", "hot"), ("max_new_tokens", "5"), ("max_new_tokens", True), ("seed", 1.5), ("stream", "yes"), ("reuse", 1), ("ratio", "half")],
)
def test_wrongly_typed_fields_get_400(url, field, value):
    code, data = raw(url, "POST", "/ask", json.dumps({**ask_body(reuse=False), field: value}).encode())
    assert code == 400 and f"'{field}' must be" in json.loads(data)["error"]


@pytest.mark.parametrize(
    "body, fragment",
    [({"document": "/tmp/x.kvc"}, "already a compressed cache"), ({"text": "t", "output": "/tmp/x.txt"}, "'output' must be"),
     ({"text": "t", "ratio": 0}, "--ratio"), ({"text": "t", "method": "nope"}, "unknown method")],
    ids=["kvc-input", "output-not-kvc", "ratio-0", "unknown-method"],
)
def test_bad_compress_requests_get_400(url, body, fragment):
    code, data = raw(url, "POST", "/compress", json.dumps({**body, "output": body.get("output", "/tmp/never-written.kvc")}).encode())
    assert code == 400 and fragment in json.loads(data)["error"], data


def test_body_too_large_gets_413(url):
    code, data = raw(url, "POST", "/ask", b"{}", {"Content-Length": str(1 << 40)})
    assert code == 413 and "too large" in json.loads(data)["error"]


def test_unknown_endpoint_and_id_are_404_traversal_is_400(url):
    code, data = raw(url, "GET", "/nope")
    assert code == 404 and "no such endpoint" in json.loads(data)["error"]
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
    sock.sendall(
        b"POST /ask HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (Client(url).token.encode(), len(body), body)
    )
    assert b"200" in sock.recv(64)  # the stream began
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with RST
    sock.close()
    assert Client(url).health()["status"] == "ok"
    result = Client(url).ask(ask_body())
    assert result["placement"]["served_from"] == "cpu"
    assert {k: (v[0], v[1]) for k, v in service.memory.items()} == before
    wait_idle(service)


def test_non_loopback_bind_is_refused(service):
    with pytest.raises(KvcliError, match="--allow-remote"):
        make_server(service, host="0.0.0.0", port=0)
    with pytest.raises(KvcliError, match="not a loopback"):
        check_loopback("8.8.8.8")
    check_loopback("localhost")
    check_loopback("::1")


def test_unix_socket_is_0600_and_needs_no_token(service, tmp_path):
    path = tmp_path / "kvcli.sock"
    server = make_server(service, socket_path=str(path))
    start(server)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert server.token is None and server.token_file is None
        client = Client(f"unix://{path}")
        assert client.token is None
        assert client.health()["status"] == "ok"
        assert client.ask(ask_body())["done"]
    finally:
        server.shutdown()
        server.server_close()
    assert not path.exists()


@pytest.mark.parametrize("case", ["missing-folder", "dangling-link", "too-long"])
def test_bad_socket_paths_are_one_line_errors(service, tmp_path, case):
    if case == "missing-folder":
        path = tmp_path / "no" / "such" / "kvcli.sock"
    elif case == "dangling-link":
        path = tmp_path / "kvcli.sock"
        path.symlink_to(tmp_path / "gone")
    else:
        path = tmp_path / ("x" * 120)
    with pytest.raises(KvcliError) as caught:
        make_server(service, socket_path=str(path))
    assert "--socket" in str(caught.value) and "\n" not in str(caught.value)


def test_server_down_is_a_one_line_error():
    with pytest.raises(KvcliError, match="cannot reach"):
        Client("http://127.0.0.1:9").health()


def test_documents_are_profiled_after_their_first_answer(service, url):
    service.manager.profiler = service.profiler(answer_tokens=3)
    Client(url).ask(ask_body(question="Where is the lighthouse?"))
    wait_idle(service)
    (entry,) = service.manager.entries.values()
    assert entry.profiled and set(entry.quality) == set(range(len(service.manager.configs)))
    (row,) = Client(url).caches()["caches"]
    assert row["profiled"] and row["quality"] == round(entry.quality[entry.config], 4)  # the listing rounds
    # the users' questions are probes of the next (idle) profile
    assert "Where is the lighthouse?" in service.manager.profiler.questions(entry, service.documents[entry.id])


def test_idle_profiling_waits_for_idleness_then_follows_new_questions(service):
    service.manager.profiler = service.profiler(answer_tokens=3)
    ask(service, ask_body())
    service.last_request = time.monotonic()  # someone just asked
    assert service.profile_idle(idle_seconds=60) is None
    (entry,) = service.manager.entries.values()
    assert entry.profiled  # profiled once right after its first answer
    ask(service, ask_body(question="A new question?"))
    assert service.profile_idle(idle_seconds=0) == entry.id  # a new question since: profiled again
    assert "A new question?" in service.manager.profiler.questions(entry, service.documents[entry.id])
    assert service.profile_idle(idle_seconds=0) is None  # nothing new since


def test_agreement_profiler_measures_every_config(service):
    entry = service.entry_for(service.read_document(DocumentSource(text=DOCUMENT)))
    quality = service.profiler(answer_tokens=4)(entry, list(range(len(service.manager.configs))))
    assert set(quality) == set(range(len(service.manager.configs)))
    assert quality[0] == 1.0  # the full cache agrees with itself
    assert all(0.0 <= q <= 1.0 for q in quality.values())
