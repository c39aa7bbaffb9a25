"""`kvcli serve`: one loaded model and the tiered cache manager behind a small local JSON API.

Shell pipelines pay no model load per call: `kvcli ask/compress/cache ... --server URL`
(or KVCLI_SERVER) send their work here. Local only by default: the server binds to a
loopback address (anything else needs --allow-remote) or to a Unix socket (mode 0600).
Document paths in requests are read by the server process.

API (JSON bodies, UTF-8; every error is {"error": "one line"} with a 4xx/5xx status)

    GET    /health            {"status": "ok", "model", "device", "pending", "tiers": [...]}
    POST   /ask               {"document": PATH | "text": TEXT, "question": Q | "questions": [Q, ...],
                               "reuse": true, "method", "ratio", "agnostic", "max_new_tokens",
                               "temperature", "seed", "stream": true}
                              reuse=true (default): the manager keeps the document's cache and
                              chooses its configuration and tier (method/ratio ignored);
                              reuse=false: one-shot with method/ratio (question-aware for one
                              question unless agnostic); a PATH ending in .kvc answers from that file.
                              stream=true: application/x-ndjson, one event a line:
                                {"token": TEXT, "index": I} ... then {"done": true, "answers": [...],
                                "answer": TEXT (first), "timings": {...}, "cache": {...}}
                                or, on a failure after streaming began, {"error": ...}
                              stream=false: the "done" object alone.
    POST   /compress          {"document" | "text", "output": PATH.kvc, "method", "ratio", "kv_dtype"}
                              -> {"output", "bytes", "cache"}; without "output": the document is
                              added to the manager -> {"entry": row of GET /caches}
    GET    /caches            {"caches": [{"id", "document", "tier", "config", "bytes", "quality",
                               "ttft_seconds", "frequency", "utility", "reason"}], "tiers": [...]}
    GET    /decisions         {"decisions": [{"at", "entry", "action", "before", "after", "reason"}]} (last 200)
    DELETE /caches/{id}       {"removed": [id]}; ids are hexadecimal (a unique prefix is enough):
                              anything else is 400, an unknown id 404
    DELETE /caches            {"removed": [ids]}: every managed cache

A wrongly typed field is a 400 like a missing one. Model work is serialized by one lock; at
most `max_pending` requests wait or run at once, the next gets 503. After each reply (still
holding the model) the server profiles documents added since and settles placement, so
neither delays a first token. A client that disconnects mid-stream stops its decode;
nothing stored changes because answers decode over a copy of the cache. Caches reach disk
only through kvcli.store.kvcfile.save_cache (atomic), so a kill mid-write leaves the previous
state; a failed write (full disk) falls back to the copy still held. On restart the disk
tier (the kvcli store) is scanned and reused; a clean stop first writes memory tiers there.
"""


from __future__ import annotations

import ipaddress
import json
import os
import socket
import socketserver
import stat
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from kvcli.errors import KvcliError
from kvcli.serve.service import Busy, ModelService, NotFound, body_field

MAX_BODY_BYTES = 64 << 20  # a long document as text fits; anything larger is refused
REQUEST_TIMEOUT = 120  # seconds a connection may stall (reading a body, or a client not reading)


class ClientGone(Exception):
    """The client closed the connection while its answer streamed."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when it closes
    server_version = "kvcli"
    timeout = REQUEST_TIMEOUT

    @property
    def service(self) -> ModelService:
        return self.server.service

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log = getattr(self.server, "log", None)
        if log is not None:
            log(f"{self.address_string()} {format % args}")

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) and self.client_address else "unix"

    def _send_json(self, status: int, payload: dict) -> None:
        data = (json.dumps(payload) + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client left; nothing to tell it

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise KvcliError("a JSON body with Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            raise KvcliError(f"request body too large ({int(length):,} bytes; at most {MAX_BODY_BYTES:,})")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise KvcliError(f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise KvcliError("the JSON body must be an object")
        return body

    def _route(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except Busy as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except KvcliError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except ClientGone:
            pass
        except Exception as exc:  # a bug must not kill the server: report it, keep serving
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._route(lambda: self._send_json(200, {
                "status": "ok", "model": self.service.model.name, "device": str(self.service.model.device),
                "pending": self.service.pending, "tiers": self.service.manager.usage(),
            }))
        elif path == "/caches":
            self._route(lambda: self._send_json(200, {"caches": self.service.manager.listing(), "tiers": self.service.manager.usage()}))
        elif path == "/decisions":
            self._route(lambda: self._send_json(200, {"decisions": [vars(d) for d in self.service.manager.decisions[-200:]]}))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path[:200]}")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/ask":
            self._route(self._ask)
        elif path == "/compress":
            self._route(self._compress)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path[:200]}")

    def do_DELETE(self):
        path = self.path.split("?", 1)[0]
        if path != "/caches" and not path.startswith("/caches/"):
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: DELETE {path[:200]}")
            return

        def remove():
            with self.service.turn():
                if path == "/caches":
                    removed = self.service.clear()
                else:
                    removed = self.service.remove(path.removeprefix("/caches/"))
            self._send_json(200, {"removed": removed})

        self._route(remove)

    def _compress(self):
        body = self._body()
        with self.service.turn():
            try:
                self._send_json(200, self.service.compress(body))
            finally:
                self.service.after_request()

    def _ask(self):
        body = self._body()
        stream = body_field(body, "stream", bool, True)
        with self.service.turn():
            try:
                self._answer(body, stream)
            finally:
                self.service.after_request()  # even when the client left mid-stream

    def _answer(self, body: dict, stream: bool) -> None:
        if not stream:
            self._send_json(200, self.service.ask(body, None))
            return
        started = False

        def emit(event: dict) -> None:
            nonlocal started
            try:
                if not started:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.end_headers()
                    started = True
                self.wfile.write((json.dumps(event) + "\n").encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, socket.timeout) as exc:
                raise ClientGone() from exc

        try:
            result = self.service.ask(body, lambda index, text: emit({"token": text, "index": index}))
        except ClientGone:
            raise
        except Exception as exc:  # once the stream began, a failure can only be its last event
            if not started:
                raise
            emit({"error": str(exc) if isinstance(exc, KvcliError) else f"internal error: {type(exc).__name__}: {exc}"})
            return
        emit(result)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True


def check_loopback(host: str) -> None:
    """Refuse to bind anywhere but loopback (the API reads local files and runs the model)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise KvcliError(f"cannot resolve --host {host}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_loopback:
            raise KvcliError(
                f"--host {host} is not a loopback address: the server reads local files and has no authentication; "
                "add --allow-remote if you really mean it"
            )


def make_server(service: ModelService, *, host: str = "127.0.0.1", port: int = 8765, socket_path: str | None = None,
                allow_remote: bool = False, log: Callable[[str], None] | None = None):
    """A ready (bound, not yet serving) HTTP server; call serve_forever() on it."""
    if socket_path is not None:
        path = Path(socket_path)
        if path.exists():
            if not stat.S_ISSOCK(path.stat().st_mode):
                raise KvcliError(f"--socket {socket_path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                raise KvcliError(f"--socket {socket_path}: another server is listening there")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()  # stale socket of a server that died
            finally:
                probe.close()
        old = os.umask(0o177)  # owner only, from the moment it exists
        try:
            server = _UnixHTTPServer(str(path), Handler)
        finally:
            os.umask(old)
    else:
        if not allow_remote:
            check_loopback(host)
        try:
            server = _TCPServer((host, port), Handler)
        except OSError as exc:
            raise KvcliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.service = service
    server.log = log
    return server


def server_url(server) -> str:
    if isinstance(server, _UnixHTTPServer):
        return f"unix://{server.server_address}"
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
