"""`kvcli serve`'s HTTP layer: the JSON API on Starlette, served by uvicorn.

Shell pipelines pay no model load per call: `kvcli ask/summarize/compress/cache ... --server
URL` (or KVCLI_SERVER) send their work here. Document paths in requests are read by the
server process, so the server serves only the user who started it:

- TCP binds to loopback (anything else needs --allow-remote) and every request must carry
  the token the server writes at start (kvcli.serve.token: a 0600 file only this user can
  read; `Authorization: Bearer TOKEN`; clients of the same user send it by themselves);
  a Unix socket (mode 0600) needs no token.
- `Host` must be a loopback name (DNS rebinding) and any `Origin` header is refused (a web
  page cannot drive the server); bodies must be `Content-Type: application/json`.

API (UTF-8 JSON; every error, 4xx or 5xx, is {"error": "one line"}; no NaN or Infinity in
any reply: a non-finite number is null)

    GET    /health            {"status": "ok", "model", "device", "pending", "utilization", "work_seconds", "tiers": [...]}
    POST   /ask               {"document": PATH | "text": TEXT, "question": Q | "questions": [Q, ...] (at most 32),
                               "reuse": true, "method", "ratio", "budget", "agnostic", "max_new_tokens",
                               "temperature", "seed", "password", "stream": true, "cite": false}
                              reuse=true (default): the manager keeps the document's cache and
                              chooses its configuration and tier (method/ratio ignored);
                              reuse=false: one-shot with method/ratio (question-aware for one
                              question unless agnostic); a PATH ending in .kvc answers from that file.
                              Questions are answered one after another over one cache.
                              cite=true: each answer record has "citations" (kvcli.citations).
                              stream=true: application/x-ndjson, one event a line:
                                {"token": TEXT, "index": I} ... then {"done": true, "answer": TEXT (first),
                                "answers": [one `kvcli ask --json` record per question],
                                "placement": {"served_from", "config", "load_seconds"}}
                                or, on a failure after streaming began, {"error": ...}
                              stream=false: the "done" object alone.
    POST   /compress          {"document" | "text", "output": PATH.kvc, "method", "ratio", "budget", "kv_dtype"}
                              -> {"output", "bytes", "document", "cache"}; without "output": the document
                              is added to the manager -> {"entry": row of GET /caches}
    GET    /caches            {"caches": [{"id", "document", "tier", "config", "bytes", "quality",
                               "ttft_seconds", "frequency", "utility", "reason", "qualities" (profiled, per
                               configuration), "document_tokens", "prefix_tokens"}], "tiers": [...]}
    GET    /decisions         {"decisions": [{"at", "entry", "action", "before", "after", "reason"}]} (last 200)
    DELETE /caches/{id}       {"removed": [id]}; ids are hexadecimal (a unique prefix is enough):
                              anything else is 400, an unknown id 404
    DELETE /caches            {"removed": [ids]}: every managed cache

Statuses: 400 bad body or field (wrong type, NaN, out of range), 401 no or wrong token,
403 foreign Host or any Origin, 404, 405, 413 body over 64 MiB, 414 target over 8 KiB,
415 not JSON, 431 headers over 32 KiB, 503 busy, 500 a bug (the server keeps serving).

Model work runs on a bounded pool of threads, one at a time under the model's lock; at most
`max_pending` requests wait or run, the next gets 503; at most `max_in_flight` requests of any
kind are handled at once. A request reads its document before taking the model. A stream
ends as soon as its answer is done: profiling the documents added since and settling
placement happen afterwards, still holding the model, so neither delays a first token nor
the end of a reply. A client that disconnects mid-stream stops its decode; nothing stored
changes because answers decode over a copy of the cache. Caches reach disk only through
kvcli.store.kvcfile.save_cache (atomic), so a kill mid-write leaves the previous state; a
failed write (full disk) falls back to the copy still held. On restart the disk tier (the
kvcli store) is scanned and reused; a clean stop first writes memory tiers there.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvcli.errors import KvcliError
from kvcli.serve import token as tokens
from kvcli.serve.requests import ask_request, compress_request, parse_json
from kvcli.serve.service import Busy, ModelService, NotFound

MAX_BODY_BYTES = 64 << 20  # a long document as text fits; anything larger is 413
MAX_TARGET_BYTES = 8 << 10  # request path + query; longer: 414
MAX_HEADER_BYTES = 32 << 10  # all header names and values together; more: 431
PARSER_LIMIT = 256 << 10  # what the HTTP parser buffers; beyond it the request is cut off (a JSON 400)
DEFAULT_MAX_IN_FLIGHT = 64  # requests handled at once (any endpoint); more: 503
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed the connection while its answer streamed."""


# ---- JSON out: always valid JSON ------------------------------------------------------


def finite(value):
    """`value` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dump(payload) -> bytes:
    return (json.dumps(finite(payload), allow_nan=False) + "\n").encode()


class JSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return dump(content)


def error_response(status: int, message: str, headers: dict | None = None) -> JSON:
    return JSON({"error": message}, status_code=status, headers=headers)


def _message(exc: BaseException) -> tuple[int, str]:
    """The status and one-line message of a failure."""
    if isinstance(exc, ApiError):
        return exc.status, str(exc)
    if isinstance(exc, Busy):
        return 503, str(exc)
    if isinstance(exc, NotFound):
        return 404, str(exc)
    if isinstance(exc, KvcliError):
        return 400, str(exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


# ---- the guard in front of every request ----------------------------------------------


def is_loopback_host(value: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    host = value.strip().lower()
    if host.startswith("["):  # [::1]:8765
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.rstrip(".") in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: sizes, token, Host, Origin and the in-flight limit, before any route."""

    def __init__(self, app, *, token: str | None, check_host: bool, max_in_flight: int, log: Callable[[str], None] | None):
        self.app, self.token, self.check_host, self.max_in_flight, self.log = app, token, check_host, max_in_flight, log
        self.in_flight = 0

    def refuse(self, scope) -> tuple[int, str] | None:
        if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > MAX_TARGET_BYTES:
            return 414, f"request target longer than {MAX_TARGET_BYTES} bytes"
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return 431, f"request headers larger than {MAX_HEADER_BYTES} bytes"
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        if self.token is not None:
            given = (headers.get("authorization") or [""])[0]
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return 401, "missing or wrong token: send `Authorization: Bearer TOKEN` with the token the server wrote at start (kvcli clients of the same user do)"
        if self.check_host and not all(is_loopback_host(h) for h in headers.get("host", ["localhost"])):
            return 403, f"Host {headers['host'][0][:100]!r} is not a loopback name"
        if "origin" in headers:
            return 403, "cross-origin requests are refused (a web page may not use this server)"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refused = self.refuse(scope)
        if refused is None and self.in_flight >= self.max_in_flight:
            refused = 503, f"server busy: {self.in_flight} requests in flight; retry later"
        try:
            if refused is not None:
                await error_response(*refused)(scope, receive, sending)
                return
            self.in_flight += 1
            try:
                await self.app(scope, receive, sending)
            finally:
                self.in_flight -= 1
        finally:
            if self.log is not None:
                client = scope.get("client")
                where = client[0] if client else "unix"
                self.log(f"{where} {scope['method']} {scope['path'][:200]} {status['code']}")


class _JsonErrorsH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a request it cannot parse gets a JSON error too."""

    def send_400_response(self, msg: str) -> None:
        body = dump({"error": f"malformed HTTP request, or its request line or headers exceed {PARSER_LIMIT} bytes"})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# ---- the application ------------------------------------------------------------------


async def read_json(request: Request) -> dict:
    """The request's JSON object body: JSON content type, at most MAX_BODY_BYTES."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body too large ({int(length):,} bytes; at most {MAX_BODY_BYTES:,})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body too large (over {MAX_BODY_BYTES:,} bytes)")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def create_app(
    service: ModelService, *, token: str | None = None, check_host: bool = True, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    log: Callable[[str], None] | None = None,
) -> Guard:
    """The ASGI application: the routes behind the Guard. `token` None: no token required."""
    pool = ThreadPoolExecutor(max_workers=service.max_pending, thread_name_prefix="kvcli-model")

    def endpoint(handler):
        """Any failure of a handler becomes its JSON error (never an HTML page or a traceback)."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # a bug must not kill the server: report it, keep serving
                return error_response(*_message(exc))

        return run

    async def model_job(document_source, work, *, streaming: bool, settle: bool):
        """Run `work(document, emit)` on the pool, in the model's turn; returns the first event.

        The document (if any) is read before the model's lock is taken. Events arrive on the
        returned queue: ("token", event) ..., then ("done", result) or ("error", exc), then
        ("end", None). With `settle`, profiling and placement run after "done" is delivered.
        """
        service.reserve()  # Busy: 503 before anything else
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def put(kind, value):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop closed (shutdown): nobody is listening
                pass

        def emit(index: int, text: str) -> None:
            if gone.is_set():
                raise ClientGone()
            put("token", {"token": text, "index": index})

        def job():
            try:
                document = service.read_document(document_source) if document_source is not None else None
                with service.lock:
                    try:
                        put("done", work(document, emit if streaming else None))
                    except BaseException as exc:  # noqa: BLE001 - delivered to the request
                        put("error", exc)
                    finally:
                        if settle:
                            try:
                                service.after_request()  # even when the client left mid-stream
                            except Exception as exc:  # the reply is out: keep the failure for the operator
                                service.warn(f"settling placement failed: {type(exc).__name__}: {exc}")
                                if log is not None:
                                    log(service.warnings[-1])
            except BaseException as exc:  # noqa: BLE001
                put("error", exc)
            finally:
                service.release()
                put("end", None)

        try:
            pool.submit(job)
        except RuntimeError:  # the pool is shut down: the server is stopping
            service.release()
            raise Busy("the server is stopping") from None
        return queue, gone

    async def first_event(queue: asyncio.Queue):
        kind, value = await queue.get()
        if kind == "error":
            raise value
        return kind, value

    @endpoint
    async def ask(request: Request) -> Response:
        parsed = ask_request(await read_json(request))
        queue, gone = await model_job(
            parsed.source, lambda document, emit: service.ask(parsed, document, emit), streaming=parsed.stream, settle=True
        )
        if not parsed.stream:
            _, result = await first_event(queue)
            return JSON(result)
        first = await first_event(queue)  # a failure before the first token is a plain error reply

        async def lines():
            kind, value = first
            try:
                while kind != "end":
                    if kind == "error":  # once the stream began, a failure can only be its last event
                        yield dump({"error": _message(value)[1]})
                        return
                    try:
                        line = dump(value)
                    except (TypeError, ValueError) as exc:
                        yield dump({"error": _message(exc)[1]})
                        return
                    yield line
                    if kind == "done":
                        return  # the reply ends here; profiling runs after, on the pool
                    kind, value = await queue.get()
            finally:
                gone.set()  # a client that left stops the decode

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @endpoint
    async def compress(request: Request) -> Response:
        parsed = compress_request(await read_json(request))
        queue, _ = await model_job(parsed.source, lambda document, emit: service.compress(parsed, document), streaming=False, settle=True)
        _, result = await first_event(queue)
        return JSON(result)

    @endpoint
    async def remove(request: Request) -> Response:
        cache_id = request.path_params.get("cache_id")
        work = (lambda document, emit: service.clear()) if cache_id is None else (lambda document, emit: service.remove(cache_id))
        queue, _ = await model_job(None, work, streaming=False, settle=False)
        _, removed = await first_event(queue)
        return JSON({"removed": removed})

    # Listings take the manager's lock (held only while a move is recorded), never the model's:
    # they answer while a request runs, from the threadpool so the event loop never waits.

    @endpoint
    async def health(request: Request) -> Response:
        usage = await run_in_threadpool(service.manager.usage)
        return JSON({"status": "ok", "model": service.model.name, "device": str(service.model.device), "pending": service.pending,
                     "utilization": round(service.lock.utilization(), 4),
                     "work_seconds": {k: round(v, 3) for k, v in service.work_seconds.items()}, "tiers": usage})

    @endpoint
    async def caches(request: Request) -> Response:
        listing = await run_in_threadpool(lambda: {"caches": service.manager.listing(), "tiers": service.manager.usage()})
        return JSON(listing)

    @endpoint
    async def decisions(request: Request) -> Response:
        return JSON({"decisions": [vars(d) for d in service.manager.decisions[-200:]]})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}", 405: f"method {request.method} not allowed on {request.url.path[:200]}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(*_message(exc))

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ask", ask, methods=["POST"]),
            Route("/compress", compress, methods=["POST"]),
            Route("/caches", caches, methods=["GET"]),
            Route("/caches", remove, methods=["DELETE"]),
            Route("/caches/{cache_id:path}", remove, methods=["DELETE"]),
            Route("/decisions", decisions, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    guard = Guard(app, token=token, check_host=check_host, max_in_flight=max_in_flight, log=log)
    guard.pool = pool
    return guard


# ---- binding and running --------------------------------------------------------------


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
                f"--host {host} is not a loopback address: the server reads local files as you; "
                "add --allow-remote if you really mean it (requests still need the token)"
            )


def check_socket_path(socket_path: str) -> None:
    """Refuse a --socket path that cannot work, before anything slow happens: too long for
    a Unix socket, in a missing folder, or already something other than a socket (a link too)."""
    path = Path(socket_path)
    if len(os.fsencode(path)) > 107:
        raise KvcliError(f"--socket {socket_path[:120]}: the path is longer than the 107 bytes a Unix socket allows")
    if not path.parent.is_dir():
        raise KvcliError(f"--socket {socket_path}: the folder {path.parent} does not exist")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise KvcliError(f"--socket {socket_path} exists and is {kind}")


def _unix_socket(socket_path: str) -> socket.socket:
    check_socket_path(socket_path)
    path = Path(socket_path)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise KvcliError(f"--socket {socket_path}: another server is listening there")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale socket of a server that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # owner only, from the moment it exists
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise KvcliError(f"cannot listen on --socket {socket_path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise KvcliError(f"cannot resolve --host {host}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise KvcliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Server:
    """A bound server: `serve_forever()` blocks (Ctrl-C / SIGTERM stop it gracefully in the
    main thread); `shutdown()` from another thread; `server_close()` releases the socket, the
    token file and the worker pool."""

    def __init__(self, app: Guard, sock: socket.socket, url: str, token_file: Path | None, socket_path: str | None = None):
        self.app, self.sock, self.url, self.token_file, self.socket_path = app, sock, url, token_file, socket_path
        sock.listen(128)
        config = uvicorn.Config(
            app, http=_JsonErrorsH11, ws="none", lifespan="off", log_config=None, access_log=False,
            h11_max_incomplete_event_size=PARSER_LIMIT, timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False,
        )
        self._uvicorn = uvicorn.Server(config)
        self._started, self._stopped = threading.Event(), threading.Event()

    @property
    def token(self) -> str | None:
        return self.app.token

    def serve_forever(self) -> None:
        self._started.set()
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        if self._started.is_set():
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.app.pool.shutdown(wait=False, cancel_futures=True)
        if self.token_file is not None:
            tokens.remove_token(self.token_file, self.app.token)
        self.sock.close()
        if self.socket_path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except OSError:
                pass


def make_server(service: ModelService, *, host: str = "127.0.0.1", port: int = 8765, socket_path: str | None = None,
                allow_remote: bool = False, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, log: Callable[[str], None] | None = None) -> Server:
    """A ready (bound, not yet serving) server; call serve_forever() on it.

    TCP: a fresh token is written for the bound port (kvcli.serve.token) and required on
    every request; the Host check stays on unless `allow_remote` (the token still holds).
    """
    if socket_path is not None:
        sock = _unix_socket(socket_path)
        app = create_app(service, token=None, check_host=True, max_in_flight=max_in_flight, log=log)
        return Server(app, sock, f"unix://{socket_path}", None, socket_path)
    if not allow_remote:
        check_loopback(host)
    sock = _tcp_socket(host, port)
    bound_port = sock.getsockname()[1]
    try:
        token, token_file = tokens.create_token(bound_port)
    except KvcliError:
        sock.close()
        raise
    app = create_app(service, token=token, check_host=not allow_remote, max_in_flight=max_in_flight, log=log)
    name = f"[{host}]" if ":" in host else host
    return Server(app, sock, f"http://{name}:{bound_port}", token_file)


def server_url(server: Server) -> str:
    return server.url
