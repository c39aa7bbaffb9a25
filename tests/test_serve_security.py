"""Issue 14's server items, one test each (all failed on the hand-written http.server code):
the token (1), bounded questions over one cache (3), document reads outside the model's
lock (4), a bad store file set aside (5), Host/Origin/content type (6), the lock file and
links (7), and the API contract (10): bad numbers, JSON errors, valid JSON out, streams that
end with their answer, bounded threads."""

import http.client
import json
import os
import socket
import stat
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest

from kvcli.errors import KvcliError
from kvcli.serve import requests
from kvcli.serve.client import Client
from kvcli.serve.server import make_server, server_url
from kvcli.serve.token import token_path
from tests.support import DOCUMENT, ask, ask_body, raw, stall_document_loads, start, tiny_service, wait_idle


def strict_json(data: bytes):
    """json.loads that refuses NaN/Infinity, which are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in a reply")

    return json.loads(data, parse_constant=refuse)


# ---- 1. the token ------------------------------------------------------------------------


def test_tcp_requests_need_the_token_kept_in_a_private_file(served, url, tmp_path):
    secret = tmp_path / "notes.txt"
    secret.write_text("the server user's private notes " * 20)
    secret.chmod(0o600)
    body = json.dumps({"document": str(secret), "question": "What do the notes say?", "reuse": False}).encode()
    for method, path, data in (("GET", "/health", None), ("GET", "/caches", None), ("POST", "/ask", body), ("DELETE", "/caches", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": served.token}):
            code, reply = raw(url, method, path, data, headers, token=False)
            assert code == 401, (method, path, headers)
            assert "token" in strict_json(reply)["error"] and b"private notes" not in reply
    path = token_path(urlsplit(url).port)
    assert served.token_file == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().strip() == served.token and len(served.token) >= 32
    assert Client(url).token == served.token  # clients of the same user read it by themselves
    assert Client(url).health()["status"] == "ok"


def test_each_start_has_a_new_token_and_a_stop_removes_it(service, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    first = make_server(service, host="127.0.0.1", port=0)
    first.server_close()
    assert not first.token_file.exists()
    second = make_server(service, host="127.0.0.1", port=0)
    try:
        assert second.token != first.token and second.token_file.exists()
    finally:
        second.server_close()


def test_a_token_file_of_someone_else_or_readable_by_others_is_not_used(tmp_path, monkeypatch):
    from kvcli.serve.token import read_token_file

    path = tmp_path / "server-1.token"
    path.write_text("abc\n")
    path.chmod(0o644)
    assert read_token_file(path) is None
    path.chmod(0o600)
    assert read_token_file(path) == "abc"
    link = tmp_path / "server-2.token"
    link.symlink_to(path)
    assert read_token_file(link) is None  # never through a link


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root to run as another user")
def test_another_local_user_cannot_read_files_through_the_server(url, tmp_path):
    """As `nobody` against a root server: no token readable, so nothing is answered."""
    secret = tmp_path / "shadow.txt"
    secret.write_text("root-only secret " * 30)
    secret.chmod(0o600)
    os.chmod(tmp_path, 0o755)  # `nobody` may name the file (and gets refused by the server, not the OS)
    parts = urlsplit(url)
    script = f"""
import http.client, json, sys
try:
    open({str(token_path(parts.port))!r}).read()
    print("TOKEN READ")
except OSError:
    pass
c = http.client.HTTPConnection("127.0.0.1", {parts.port}, timeout=60)
body = json.dumps({{"document": {str(secret)!r}, "question": "What is the secret?", "reuse": False, "stream": False}})
c.request("POST", "/ask", body=body, headers={{"Content-Type": "application/json"}})
r = c.getresponse()
print(r.status, r.read().decode())
"""
    nobody = 65534
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: (os.setgroups([]), os.setgid(nobody), os.setuid(nobody)), cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert "TOKEN READ" not in result.stdout
    assert result.stdout.startswith("401 ") and "secret" not in result.stdout.split(" ", 1)[1].replace("token", "")


# ---- 6. browsers: Host, Origin, content type -----------------------------------------------


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Host": "evil.example", "Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
        ({"Host": "evil.example:8765"}, 403),
        ({"Host": "127.0.0.1.evil.example"}, 403),
        ({"Origin": "http://127.0.0.1:8765"}, 403),
        ({"Origin": "null"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ],
    ids=["rebinding-cross-site-text", "foreign-host", "lookalike-host", "same-origin-page", "null-origin", "text-plain", "form"],
)
def test_browsers_cannot_drive_the_server(url, tmp_path, headers, status):
    out = tmp_path / "planted.kvc"
    body = json.dumps({"text": DOCUMENT, "output": str(out), "ratio": 0.5}).encode()
    code, reply = raw(url, "POST", "/compress", body, headers)
    assert code == status and "error" in strict_json(reply)
    assert not out.exists()


@pytest.mark.parametrize("host", ["localhost", "localhost:8765", "127.0.0.1:1", "[::1]:8765", "127.0.0.2"])
def test_loopback_host_names_are_accepted(url, host):
    code, reply = raw(url, "GET", "/health", headers={"Host": host})
    assert code == 200, reply


# ---- 7. the lock file --------------------------------------------------------------------


def test_the_store_lock_is_not_opened_through_a_link(tmp_path):
    from kvcli.cli.serve import _claim_store

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = tmp_path / "store"
    store.mkdir()
    (store / ".serve.lock").symlink_to(victim)
    with pytest.raises(KvcliError, match="symbolic link"):
        _claim_store(store)
    assert victim.read_text() == "precious"
    (store / ".serve.lock").unlink()
    handle = _claim_store(store)
    assert stat.S_IMODE((store / ".serve.lock").stat().st_mode) == 0o600
    handle.close()


# ---- 3. questions per request: bounded, over one cache -------------------------------------


def test_too_many_questions_are_refused(url):
    questions = [f"Question {i}?" for i in range(requests.MAX_QUESTIONS + 1)]
    code, reply = raw(url, "POST", "/ask", json.dumps({"text": DOCUMENT, "questions": questions}).encode())
    assert code == 400 and "too many questions" in strict_json(reply)["error"]
    code, reply = raw(url, "POST", "/ask", json.dumps({"text": DOCUMENT, "question": "x" * 10_000}).encode())
    assert code == 400 and "longer than" in strict_json(reply)["error"]


def test_several_questions_are_answered_over_one_cache_not_one_copy_each(service, monkeypatch):
    from kvcli.cache import CompressedCache

    questions = ["Who counted?", "What was counted?", "When?", "Where is the lighthouse?", "Why?"]
    alone = [ask(service, {"text": DOCUMENT, "question": q, "max_new_tokens": 5, "reuse": False, "agnostic": True})["answer"] for q in questions]
    copies = []
    original = CompressedCache.repeat

    def counting(self, batch):
        copies.append(batch)
        return original(self, batch)

    monkeypatch.setattr(CompressedCache, "repeat", counting)
    result = ask(service, {"text": DOCUMENT, "questions": questions, "max_new_tokens": 5, "reuse": False})
    assert [r["answer"] for r in result["answers"]] == alone  # each as if asked alone
    assert copies and max(copies) == 1  # never a batch of copies: one working cache at a time


# ---- 4. a document read never holds the model ---------------------------------------------


def test_a_stuck_document_read_does_not_hold_the_model(url, service, monkeypatch, tmp_path):
    slow = tmp_path / "slow.txt"
    slow.write_text(DOCUMENT)
    entered, release = stall_document_loads(monkeypatch, only=str(slow))
    results = {}

    def slow_request():
        results["slow"] = raw(url, "POST", "/ask", json.dumps({"document": str(slow), "question": "q", "max_new_tokens": 3, "stream": False}).encode())

    thread = threading.Thread(target=slow_request)
    thread.start()
    try:
        assert entered.wait(30)
        started = time.monotonic()
        other = Client(url, timeout=20).ask(ask_body(text="Another document. " * 10, max_new_tokens=3))
        assert other["done"] and time.monotonic() - started < 20
    finally:
        release.set()
        thread.join(60)
    assert results["slow"][0] == 200
    wait_idle(service)


# ---- 5. one bad store file is set aside, not fatal -----------------------------------------


def test_bad_store_files_are_set_aside_with_a_warning_at_start(char_tokenizer):
    from kvcli.store.kvcfile import load_cache, save_cache
    from kvcli.store.persist import store_dir

    first = tiny_service(char_tokenizer)
    ask(first, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 3})
    (good,) = store_dir().glob("*.kvc")
    cache, header = load_cache(good)
    content = header.as_dict()
    content["manager"] = {**content["manager"], "quality": {"full@1/auto": "high"}}  # mistyped bookkeeping
    other = {k: v for k, v in content.items() if k not in ("format", "format_version")}
    other["document"] = {**other["document"], "sha256": "0" * 64}
    save_cache(store_dir() / ("b" * 32 + ".kvc"), cache, other)
    (store_dir() / ("c" * 32 + ".kvc")).write_bytes(b"\x00" * 64)  # not a cache at all
    restarted = tiny_service(char_tokenizer)
    assert restarted.rediscover() == 1  # the good one
    assert len(restarted.warnings) == 2 and all("set aside" in w for w in restarted.warnings)
    aside = sorted(p.name for p in (store_dir() / "set-aside").iterdir())
    assert aside == ["b" * 32 + ".kvc", "c" * 32 + ".kvc"]  # moved, not deleted
    assert ask(restarted, {"text": DOCUMENT, "question": "How many?", "max_new_tokens": 3})["placement"]["served_from"] == "disk"


# ---- 10. the API contract -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [b'"temperature": NaN', b'"temperature": Infinity', b'"temperature": -Infinity', b'"temperature": 1e999',
     b'"seed": 1000000000000000000000000000000', b'"seed": -1', b'"max_new_tokens": 1000000000000000000000000000000',
     b'"ratio": 1e999', b'"budget": 0'],
    ids=["nan", "infinity", "minus-infinity", "overflow", "seed-1e30", "seed-negative", "tokens-1e30", "ratio-overflow", "budget-0"],
)
def test_bad_numbers_are_400s(url, extra):
    body = b'{"text": "%s", "question": "q", "reuse": false, %s}' % (DOCUMENT.encode(), extra)
    code, reply = raw(url, "POST", "/ask", body)
    assert code == 400, reply
    assert "'" in strict_json(reply)["error"] or "JSON" in strict_json(reply)["error"]


def _raw_socket(url, data: bytes) -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(b":") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "status, request_bytes",
    [
        (404, b"GET /nope HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"),
        (405, b"GET /ask HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"),
        (405, b"BREW /health HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"),
        (413, b"POST /ask HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n"),
        (414, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"),
        (431, b"GET /health HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n"),
        (400, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Huge: " + b"h" * 400_000),  # never ends: the parser gives up
        (400, b"NOT HTTP AT ALL\r\n\r\n"),
        (401, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ],
    ids=["404", "405", "405-unknown-method", "413", "414", "431", "headers-beyond-the-parser", "garbage", "401"],
)
def test_every_error_body_is_json(url, status, request_bytes):
    code, headers, body = _raw_socket(url, request_bytes.replace(b"{token}", Client(url).token.encode()))
    assert code == status
    assert headers[b"content-type"].startswith(b"application/json")
    assert isinstance(strict_json(body)["error"], str)


def test_health_and_caches_are_valid_json_with_null_for_infinite(url):
    Client(url).ask(ask_body())
    for path in ("/health", "/caches", "/decisions"):
        code, reply = raw(url, "GET", path)
        assert code == 200
        strict_json(reply)  # Infinity / NaN would raise
    tiers = strict_json(raw(url, "GET", "/health")[1])["tiers"]
    assert tiers[0]["tier"] == "cpu" and tiers[0]["bandwidth"] is None  # the compute tier: infinitely fast


def test_a_stream_ends_when_its_answer_is_done_profiling_comes_after(url, service, monkeypatch):
    settle, settled = threading.Event(), threading.Event()
    original = service.after_request

    def slow_after_request():
        settle.wait(60)  # profiling a long document takes this long
        original()
        settled.set()

    monkeypatch.setattr(service, "after_request", slow_after_request)
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    started = time.monotonic()
    connection.request("POST", "/ask", body=json.dumps(ask_body()).encode(),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {Client(url).token}"})
    response = connection.getresponse()
    lines = response.read().decode().splitlines()  # to the end of the reply
    elapsed = time.monotonic() - started
    connection.close()
    assert not settle.is_set() and elapsed < 20
    assert json.loads(lines[-1])["done"]
    settle.set()
    assert settled.wait(60)  # and the settling did run, afterwards
    wait_idle(service)


def test_idle_connections_cost_no_thread_each(url):
    parts = urlsplit(url)
    before = threading.active_count()
    idle = [socket.create_connection((parts.hostname, parts.port)) for _ in range(100)]
    try:
        time.sleep(0.5)
        assert Client(url).health()["status"] == "ok"
        assert threading.active_count() - before < 10  # not one per connection
    finally:
        for sock in idle:
            sock.close()


def test_requests_in_flight_are_bounded(service, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    server = make_server(service, host="127.0.0.1", port=0, max_in_flight=1)
    start(server)
    url = server_url(server)
    entered, release = stall_document_loads(monkeypatch)
    first = threading.Thread(target=lambda: raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, max_new_tokens=2)).encode()))
    first.start()
    try:
        assert entered.wait(30)
        code, reply = raw(url, "GET", "/health")
        assert code == 503 and "busy" in strict_json(reply)["error"]
    finally:
        release.set()
        first.join(60)
        server.shutdown()
        server.server_close()


def test_model_requests_beyond_max_pending_get_503_while_listings_still_answer(url, service, monkeypatch):
    service.max_pending = 1
    entered, release = stall_document_loads(monkeypatch)
    first = threading.Thread(target=lambda: raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, max_new_tokens=2)).encode()))
    first.start()
    try:
        assert entered.wait(30)
        code, reply = raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, max_new_tokens=2)).encode())
        assert code == 503 and "busy" in strict_json(reply)["error"]
        code, reply = raw(url, "DELETE", "/caches")
        assert code == 503
        assert raw(url, "GET", "/caches")[0] == 200
    finally:
        release.set()
        first.join(60)
    wait_idle(service)
    assert raw(url, "POST", "/ask", json.dumps(ask_body(stream=False, max_new_tokens=2)).encode())[0] == 200
