"""A tiny stdlib client for `kvcli serve` (see kvcli.serve.server for the API).

    client = Client("http://127.0.0.1:8765")        # or "unix:///run/user/1000/kvcli.sock"
    result = client.ask({"document": "report.pdf", "question": "Who audited it?"}, on_token=print)

The CLI uses it when --server URL or KVCLI_SERVER is set: the model stays loaded in the
server, so each call costs a round trip instead of a model load. Over TCP it sends the
server's token, read from the file the server wrote for its port (kvcli.serve.token) or
from $KVCLI_SERVER_TOKEN. Every failure (server down, 4xx/5xx, a stream cut short) is a
one-line KvcliError.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from typing import Callable
from urllib.parse import quote, urlsplit

from kvcli.errors import KvcliError
from kvcli.serve.token import client_token

SERVER_ENV = "KVCLI_SERVER"
DEFAULT_TIMEOUT = 600.0  # seconds without a byte from the server (a long document's first read)
QUESTIONS_PER_REQUEST = 32  # the server's kvcli.serve.requests.MAX_QUESTIONS (this module stays stdlib-only)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (the host name is only for the Host header)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class Client:
    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT, token: str | None = None):
        """`token`: the server's token (default: read for the URL's port, see kvcli.serve.token)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "unix"):
            raise KvcliError(f"--server {url}: use http://HOST:PORT or unix:///path/to/socket")
        if parts.scheme == "unix" and not parts.path:
            raise KvcliError(f"--server {url}: no socket path")
        try:
            port = parts.port or 8765
        except ValueError:
            raise KvcliError(f"--server {url}: the port is not a number") from None
        self.url, self.parts, self.timeout, self.port = url, parts, timeout, port
        self.token = token if token is not None or parts.scheme == "unix" else client_token(port)

    def _connection(self) -> http.client.HTTPConnection:
        if self.parts.scheme == "unix":
            return _UnixConnection(self.parts.path, self.timeout)
        return http.client.HTTPConnection(self.parts.hostname or "127.0.0.1", self.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        connection = self._connection()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise KvcliError(f"cannot reach the kvcli server at {self.url}: {getattr(exc, 'strerror', None) or exc}") from None
        if response.status >= 400:
            raw = response.read()
            connection.close()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace").strip()[:200] or response.reason
            raise KvcliError(f"server: {message}")
        return response

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self._request(method, path, body)
        try:
            return json.loads(response.read())
        except ValueError as exc:
            raise KvcliError(f"the server at {self.url} sent an unreadable reply: {exc}") from None
        finally:
            response.close()

    def health(self) -> dict:
        return self._json("GET", "/health")

    def caches(self) -> dict:
        return self._json("GET", "/caches")

    def decisions(self) -> list[dict]:
        return self._json("GET", "/decisions")["decisions"]

    def remove(self, cache_id: str) -> list[str]:
        return self._json("DELETE", f"/caches/{quote(cache_id, safe='')}")["removed"]

    def clear(self) -> list[str]:
        return self._json("DELETE", "/caches")["removed"]

    def compress(self, body: dict) -> dict:
        return self._json("POST", "/compress", body)

    def ask(self, body: dict, on_token: Callable[[int, str], None] | None = None) -> dict:
        """POST /ask streaming; on_token(question index, text) as tokens arrive; returns the done event."""
        response = self._request("POST", "/ask", {**body, "stream": True})
        try:
            for line in response:
                try:
                    event = json.loads(line)
                except ValueError:
                    raise KvcliError(f"the server at {self.url} sent an unreadable event") from None
                if "error" in event:
                    raise KvcliError(f"server: {event['error']}")
                if event.get("done"):
                    return event
                if on_token is not None:
                    on_token(event.get("index", 0), event["token"])
        except (OSError, http.client.HTTPException) as exc:
            raise KvcliError(f"the connection to {self.url} broke mid-answer: {exc}") from None
        finally:
            response.close()
        raise KvcliError(f"the server at {self.url} ended the answer early")


# ---- what the CLI commands do with --server -------------------------------------------------


def document_field(source: str) -> dict:
    """How to name a document to a local server: an absolute path, or the text of stdin."""
    if source == "-":
        data = sys.stdin.buffer.read()
        if data.startswith(b"%PDF-"):  # the API carries text; the server reads a PDF from its path
            raise KvcliError("a PDF on stdin cannot go through --server: give its path instead")
        return {"text": data.decode("utf-8", "replace")}
    return {"document": os.path.abspath(source)}


def remote_ask(
    url: str, *, source: str, questions: list[str], method: str, ratio: float | None, budget: int | None,
    agnostic: bool, reuse: bool, max_new_tokens: int, temperature: float, seed: int | None, password: str | None,
    json_out: bool, write: Callable[[str], None] | None = None, process_start: float | None = None, cite: bool = False,
) -> dict:
    """`kvcli ask --server`: stream the answer to `write`, or print what `kvcli ask` prints.

    --json gives one JSON object per question, the same record as without a server
    (kvcli.api.report); where the server found the cache is in the result's "placement".
    `process_start` (time.perf_counter() clock): each record's timings get
    `wall_to_first_token_seconds`, from then to its first token arriving here, as the CLI
    reports it without a server. `cite`: the server cites pages (text ends with "(p. 3)").
    """
    body = {
        **document_field(source), "questions": questions, "reuse": reuse, "method": method, "ratio": ratio,
        "budget": budget, "agnostic": agnostic, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "seed": seed, "password": password, "cite": cite or None,
    }
    body = {k: v for k, v in body.items() if v is not None}
    write = write or sys.stdout.write  # looked up per call: sys.stdout may have been replaced
    stream = not json_out and len(questions) == 1
    client = Client(url)
    for start in range(0, len(questions), QUESTIONS_PER_REQUEST):  # the server takes a bounded number at once
        body["questions"] = questions[start : start + QUESTIONS_PER_REQUEST]
        arrived: dict[int, float] = {}

        def on_token(index: int, text: str) -> None:
            arrived.setdefault(index, time.perf_counter())
            if stream:
                write(text)

        result = client.ask(body, on_token=on_token)
        done = time.perf_counter()
        for index, item in enumerate(result["answers"]):
            if process_start is not None:
                item["timings"]["wall_to_first_token_seconds"] = round(arrived.get(index, done) - process_start, 4)
            cited = f" {_pages(item['citations'])}" if "citations" in item else ""
            if json_out:
                write(json.dumps(item) + "\n")
            elif stream:
                write(cited + "\n")
            else:
                write(f"Q: {item['question']}\n{item['answer']}{cited}\n\n")
    return result


def _pages(citations: list[dict]) -> str:
    """kvcli.citations.format_pages over the JSON records (not imported: it would load torch)."""
    return "(" + ", ".join(f"p. {c['page']}" for c in citations) + ")" if citations else "(no page cited)"


def remote_compress(
    url: str, *, source: str, output: str | None, method: str, ratio: float | None, budget: int | None, kv_dtype: str,
    password: str | None,
) -> dict:
    """`kvcli compress --server`: the server writes `output` (made absolute), or, without
    one, adds the document to its managed caches (profiled, placed by the joint policy)."""
    body = {**document_field(source), "method": method, "ratio": ratio, "budget": budget, "kv_dtype": kv_dtype, "password": password}
    if output is not None:
        body["output"] = os.path.abspath(output)
    else:  # the manager chooses the configuration
        body = {k: body[k] for k in ("document", "text", "password") if k in body}
    return Client(url).compress({k: v for k, v in body.items() if v is not None})


CACHE_HEADER = f"{'id':<12}  {'tier':<5} {'configuration':<22} {'size':>11}  {'quality':>7}  {'utility':>8}  document"


def format_cache_row(row: dict) -> str:
    """One line of `kvcli cache list --server`: tier, configuration, size, quality, utility
    (a number the server could not give, sent as null, shows as '-')."""

    def number(value, spec: str, width: int) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(width)

    return (
        f"{row['id'][:12]}  {row['tier']:<5} {row['config']:<22} {number((row['bytes'] or 0) / 1e6, '8.1f', 8)} MB  "
        f"{number(row['quality'], '>7.3f', 7)}  {number(row['utility'], '>+8.3f', 8)}  {row['document']}"
    )
