"""`kvcli chat DOC`: read and compress a document once, then answer question after question.

Two sessions with one face (`ask` -> `Reply`, `save`, `info`, `set_cite`, `replies`): `ChatSession`
holds the compressed cache in this process, `RemoteChat` asks a running `kvcli serve`,
which keeps the document among its managed caches. Each question is answered on its own
working copy of the cache (kvcli.api.answer appends the question part to a copy), so the
document's cache is never consumed, and an answer stopped with Ctrl-C leaves it as read.

`run_loop` is the terminal around a session: readline history, slash commands, Ctrl-C
(stops an answer, or clears the line) and Ctrl-D (leaves). Nothing heavy is imported at
the top: `kvcli --help` stays fast.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvcli.cli.common import Reporter, load_model_reporting, process_started, stderr
from kvcli.errors import KvcliError

if TYPE_CHECKING:
    from kvcli.api import Compressed, Generation
    from kvcli.documents import Document
    from kvcli.models import LoadedModel
    from kvcli.store.header import KvcHeader

TextSink = Callable[[str], None]
HISTORY_FILE = "chat_history"  # under the kvcli cache dir
HISTORY_LENGTH = 1000
HELP = """\
Type a question and press Enter: the answer streams from the document's compressed cache.
  /save FILE.kvc   save the compressed cache (atomically), for `kvcli ask FILE.kvc` or `kvcli chat FILE.kvc`
  /cite on|off     end each answer with the pages it drew on
  /info            the document, the compression, its memory and the time to first token so far
  /help            this text
Up/Down: earlier questions.  Ctrl-C: stop an answer, or clear the line.  Ctrl-D: leave."""


@dataclass
class Reply:
    """One answer of a chat, local or through a server."""

    question: str
    answer: str
    ttft_seconds: float  # from asking to the first answer token
    tokens_per_second: float
    citations: list[dict] | None = None  # with /cite on: {"page", "share", "snippet"}, best first

    def cited_pages(self) -> str:
        """"(p. 3, p. 7)" after a cited answer, "" otherwise: kvcli.citations.format_pages, over
        the JSON records both sessions have (a server's reply holds no Citation objects)."""
        if self.citations is None:
            return ""
        return "(" + ", ".join(f"p. {c['page']}" for c in self.citations) + ")" if self.citations else "(no page cited)"


class ChatSession:
    """A compressed document open for questions, in this process.

        compressed = api.read(model, document, make_press("kvzip", ratio=0.25))
        session = ChatSession(model, compressed, document=document)
        session.set_cite(True)
        session.ask("Who audited the accounts?", on_text=print)   # -> Reply
        session.save("report.kvc")

    `document` (read now) or `header` (loaded from a .kvc file) says what the cache is of.
    """

    def __init__(
        self,
        model: LoadedModel,
        compressed: Compressed,
        *,
        document: Document | None = None,
        header: KvcHeader | None = None,
        generation: Generation | None = None,
    ):
        from dataclasses import replace

        from kvcli import api, generate

        if (document is None) == (header is None):
            raise TypeError("give the document the cache was read from, or the header of its file")
        if not compressed.agnostic:
            raise KvcliError("a chat needs a question-agnostic cache (one read without a question)")
        self.model, self.compressed = model, compressed
        self.document, self.header = document, header
        self.generation = generation or api.Generation()
        # Decoding runs in the model's dtype: cast once here, not for every question (api.answer
        # would); the cache as read is what /save writes.
        self.decoding = replace(compressed, cache=generate.in_dtype(compressed.cache, model.dtype))
        self.replies: list[Reply] = []
        self.cite = False

    def ask(self, question: str, on_text: TextSink | None = None) -> Reply:
        """Answer `question`, streaming its text to `on_text`; the cache is left as it was."""
        from kvcli import api

        question = _checked(question)
        emit = None if on_text is None else (lambda _index, text: on_text(text))
        (result,) = api.answer(self.model, self.decoding, [question], self.generation, on_text=emit, cite=self.cite)
        citations = None if result.citations is None else [c.as_dict() for c in result.citations]
        reply = Reply(question, result.answer, result.ttft_seconds, result.decode_tokens_per_second, citations)
        self.replies.append(reply)
        return reply

    def set_cite(self, on: bool) -> None:
        if on and self.compressed.pages is None:
            raise KvcliError(f"{self.compressed.source} has no page map (saved by an older kvcli): compress the document again to cite pages")
        self.cite = on

    def save(self, path: str) -> int:
        """Write the cache as read to `path` (a .kvc file, atomically); returns its size."""
        from kvcli.store import persist
        from kvcli.store.kvcfile import save_cache

        path = _kvc_path(path)
        if self.document is not None:
            return save_cache(path, self.compressed.cache, persist.header_for(self.model, self.document, self.compressed, "auto"))
        # From a file: what it said the cache is of, stored in the precision it was stored in.
        content = {key: value for key, value in self.header.as_dict().items() if key in _DOCUMENT_KEYS}
        content["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return save_cache(path, self.compressed.cache, content, kv_dtype=self.header.kv_dtype)

    def info(self) -> dict:
        stats = self.compressed.stats()
        if self.document is not None:
            name, pages = self.document.name, self.document.num_pages
        else:
            name, pages = self.header.document.name, len(self.header.document.pages)
        prefill = self.compressed.prefill
        return {
            "document": name,
            "pages": pages,
            "source": self.compressed.source or "read in this chat",
            "model": self.model.name,
            "method": stats["method"],
            "ratio": stats["ratio"],
            "budget": stats["budget"],
            "document_tokens": stats["document_tokens"],
            "kept_fraction": round(stats["kept_fraction"], 4),
            "cache_bytes": stats["compressed_bytes"],
            "full_cache_bytes": stats["full_bytes"],
            "read_seconds": round(prefill.prefill_seconds, 3) if prefill else None,
            "first_token_seconds": [round(r.ttft_seconds, 3) for r in self.replies],
            "citations": self.cite,
        }


# The parts of a .kvc header that say what the cache is of (the rest describes its tensors).
_DOCUMENT_KEYS = ("model", "document", "prefix_ids", "method", "stats")


class RemoteChat:
    """The same session through `kvcli serve`: the server holds the cache (among its managed
    caches, placed by its policy, or the .kvc file given), this process only asks."""

    def __init__(self, url: str, source: str, generation: Generation, *, method: str, ratio: float | None,
                 budget: int | None, password: str | None):
        from kvcli.serve.client import Client

        self.client, self.url, self.generation = Client(url), url, generation
        self.document = {"document": os.path.abspath(source), **({"password": password} if password else {})}
        self.press = {k: v for k, v in (("method", method), ("ratio", ratio), ("budget", budget)) if v is not None}
        self.from_file = source.endswith(".kvc")
        # Read it now, among the server's caches, so the first question does not wait for it.
        self.entry = None if self.from_file else self.client.compress(self.document)["entry"]
        self.replies: list[Reply] = []
        self.last: dict | None = None
        self.cite = False

    def ask(self, question: str, on_text: TextSink | None = None) -> Reply:
        question = _checked(question)
        g = self.generation
        body = {**self.document, "questions": [question], "reuse": True, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature}
        if g.seed is not None:
            body["seed"] = g.seed
        if self.cite:
            body["cite"] = True
        started = time.perf_counter()
        arrived: list[float] = []

        def on_token(_index: int, text: str) -> None:
            if not arrived:
                arrived.append(time.perf_counter())
            if on_text is not None:
                on_text(text)

        self.last = self.client.ask(body, on_token=on_token)
        finished = time.perf_counter()
        record = self.last["answers"][0]
        first = arrived[0] if arrived else finished
        reply = Reply(question, record["answer"], first - started, record["timings"]["decode_tokens_per_second"], record.get("citations"))
        self.replies.append(reply)
        return reply

    def set_cite(self, on: bool) -> None:
        self.cite = on  # a cache the server cannot cite from says so at the next question

    def save(self, path: str) -> int:
        """The server reads the document again into `path` with this chat's method."""
        if self.from_file:
            raise KvcliError(f"{self.document['document']} is already a saved cache; copy that file instead")
        result = self.client.compress({**self.document, **self.press, "output": os.path.abspath(_kvc_path(path))})
        return result["bytes"]

    def info(self) -> dict:
        details: dict = {"document": self.document["document"], "server": self.url}
        if self.entry is not None:
            details.update(configuration=self.entry["config"], tier=self.entry["tier"], cache_bytes=self.entry["bytes"])
        if self.last is not None:
            record = self.last["answers"][0]
            cache = record["cache"]
            details.update(
                pages=record["document"]["pages"], document_tokens=record["document"]["tokens"], method=cache["method"],
                ratio=cache["ratio"], kept_fraction=round(cache["kept_fraction"], 4), cache_bytes=cache["compressed_bytes"],
                served_from=self.last["placement"]["served_from"],
            )
        details["first_token_seconds"] = [round(r.ttft_seconds, 3) for r in self.replies]
        details["citations"] = self.cite
        return details


def _checked(question: str) -> str:
    question = question.strip()
    if not question:
        raise KvcliError("the question is empty")
    return question


def _kvc_path(path: str) -> str:
    path = os.path.expanduser(path)
    if not path.endswith(".kvc"):
        raise KvcliError(f"/save: the file name must end in .kvc (got {path})")
    return path


# ---- commands and the terminal loop -------------------------------------------------------


def run_command(session: ChatSession | RemoteChat, line: str) -> str:
    """One slash command; returns what to show. Bad commands are one-line KvcliErrors."""
    try:
        name, *args = shlex.split(line)
    except ValueError as exc:
        raise KvcliError(f"cannot read the command: {exc}") from None
    if name == "/help" and not args:
        return HELP
    if name == "/info" and not args:
        return format_info(session.info())
    if name == "/save":
        if len(args) != 1:
            raise KvcliError("give one file name: /save FILE.kvc")
        written = session.save(args[0])
        return f"saved {args[0]} ({written / 1e6:.1f} MB)"
    if name == "/cite":
        if args not in (["on"], ["off"]):
            raise KvcliError("say /cite on or /cite off")
        session.set_cite(args[0] == "on")
        return f"citations {args[0]}"
    if name in ("/help", "/info"):
        raise KvcliError(f"{name} takes no argument")
    raise KvcliError(f"unknown command {name}; /help lists the commands")


def format_info(details: dict) -> str:
    shown = dict(details)
    for key in ("cache_bytes", "full_cache_bytes"):
        if isinstance(shown.get(key), int):
            shown[key] = f"{shown[key] / 1e6:.2f} MB"
    if "kept_fraction" in shown:
        shown["kept_fraction"] = f"{shown['kept_fraction']:.1%}"
    shown["first_token_seconds"] = ", ".join(f"{s:.2f} s" for s in details["first_token_seconds"]) or "no question yet"
    width = max(map(len, shown))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in shown.items() if value is not None)


class History:
    """Questions of earlier chats for readline's Up/Down, in a private file (mode 0600: the
    questions say what the documents hold). Only on a terminal."""

    def __init__(self, path: Path):
        import readline

        self.path, self.readline = path, readline
        readline.set_history_length(HISTORY_LENGTH)
        try:
            readline.read_history_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            stderr.print(f"[yellow]warning:[/] cannot read the chat history {path}: {exc.strerror or exc}")

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created private, and never written through a link planted at its name.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            self.readline.write_history_file(self.path)
        except OSError as exc:
            stderr.print(f"[yellow]warning:[/] cannot write the chat history {self.path}: {exc.strerror or exc}")


def run_loop(session: ChatSession | RemoteChat, reporter: Reporter, *, history_path: Path | None = None) -> None:
    """Read questions and commands until Ctrl-D (or the end of stdin), answering each."""
    interactive = sys.stdin.isatty()
    history = History(history_path) if interactive and history_path is not None else None
    prompt = "> " if interactive else ""
    try:
        while True:
            try:
                line = input(prompt).strip()
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh, empty line
                sys.stdout.write("\n")
                continue
            except EOFError:
                if interactive:
                    sys.stdout.write("\n")
                return
            if not line:
                continue
            try:
                if line.startswith("/"):
                    sys.stdout.write(run_command(session, line) + "\n")
                else:
                    _answer(session, line, reporter)
            except KvcliError as exc:
                stderr.print(f"[red]error:[/] {exc}", soft_wrap=True)
            except KeyboardInterrupt:
                # An answer is dropped with its working copy (the cache stays as read); a /save
                # is atomic, so nothing is left half-written.
                sys.stdout.write("\n")
                stderr.print("[dim](stopped)[/]")
            sys.stdout.flush()
    finally:
        if history is not None:
            history.save()


def _answer(session: ChatSession | RemoteChat, question: str, reporter: Reporter) -> None:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    reply = session.ask(question, on_text=write)
    sys.stdout.write(f" {reply.cited_pages()}\n" if reply.citations is not None else "\n")
    reporter.note(f"[dim]first token {reply.ttft_seconds:.2f} s, {reply.tokens_per_second:.1f} tokens/s[/]")


def timings_line(session: ChatSession | RemoteChat, ready_after: float) -> str:
    """What --timings prints on leaving: when the chat was ready (model loaded, document
    read), and the time to first token of each question from its Enter."""
    firsts = ", ".join(f"question {i} {r.ttft_seconds:.2f} s" for i, r in enumerate(session.replies, 1)) or "no question asked"
    return f"ready {ready_after:.2f} s after start; time to first token: {firsts}"


# ---- opening a chat ---------------------------------------------------------------------


def open_local(
    source: str, reporter: Reporter, *, model: str, device: str, dtype: str, method: str | None, ratio: float | None,
    budget: int | None, alpha: float | None, generation: Generation, password: str | None, chunk_size: int,
    max_context: int | None,
) -> ChatSession:
    """Load the model and the cache: a .kvc file as it is, a document read and compressed
    question-agnostically (the default agnostic method unless `method`)."""
    from kvcli import api
    from kvcli.compress.methods import default_method, make_press
    from kvcli.store import persist

    if persist.is_cache_file(source):
        from kvcli.store.kvcfile import read_header

        read_header(source)  # a bad file fails here, before the model is loaded
        loaded = load_model_reporting(model, device, reporter, dtype, plain=True)  # a session over a file reads no document
        compressed, header = persist.load(loaded, source)
        reporter.note(f"[dim]reusing {source}: {header.document.name}, {header.method.method} at ratio {header.method.ratio}[/]")
        return ChatSession(loaded, compressed, header=header, generation=generation)
    from kvcli.documents import load_document

    press = make_press(method or default_method(agnostic=True), ratio=ratio, budget=budget, alpha=alpha)
    document = load_document(source, password=password)
    for warning in document.warnings:
        reporter.warn(f"{document.name}: {warning}")
    loaded = load_model_reporting(model, device, reporter, dtype)
    with reporter.layers(f"Reading {document.name}") as progress:  # in the reading precision (api.read)
        compressed = api.read(
            loaded, document, press, chunk_size=chunk_size, headroom_tokens=generation.max_new_tokens, progress=progress,
            max_context=max_context,
        )
    notice = api.progressive_notice(compressed)
    if notice:
        reporter.note(f"[dim]{notice}[/]")
    stats = compressed.stats()
    reporter.note(
        f"[dim]{stats['document_tokens']} document tokens, kept {stats['kept_fraction']:.0%} ({press.name}), "
        f"read in {compressed.prefill.prefill_seconds:.2f} s[/]"
    )
    return ChatSession(loaded, compressed, document=document, generation=generation)


def run(
    source: str, *, model: str, device: str, dtype: str, method: str | None, ratio: float | None, budget: int | None,
    alpha: float | None, max_new_tokens: int, temperature: float, seed: int | None, quiet: bool, password: str | None,
    chunk_size: int, max_context: int | None, server: str | None, timings: bool, cite: bool = False,
) -> None:
    """`kvcli chat`: open the session, then answer until Ctrl-D."""
    if source == "-":
        raise KvcliError("chat reads its questions from the terminal, so the document cannot come from stdin: "
                         "give a file (or `kvcli compress - -o doc.kvc` first)")
    from kvcli.precision import parse as parse_dtype

    dtype = parse_dtype(dtype)  # before anything slow: a bad value is a one-line error
    from kvcli.api import Generation
    from kvcli.models import cache_dir

    generation = Generation(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    reporter = Reporter(quiet)
    if server:
        if alpha is not None or max_context is not None:
            raise KvcliError("--alpha and --max-context do not go through --server (the server reads the document)")
        if method is not None or ratio is not None or budget is not None:
            reporter.warn("through --server the server chooses how its caches are compressed; --method, --ratio and --budget apply to /save")
        session = RemoteChat(server, source, generation, method=method, ratio=ratio, budget=budget, password=password)
        reporter.note(f"[dim]chatting through {server}[/]")
    else:
        session = open_local(
            source, reporter, model=model, device=device, dtype=dtype, method=method, ratio=ratio, budget=budget,
            alpha=alpha, generation=generation, password=password, chunk_size=chunk_size, max_context=max_context,
        )
    session.set_cite(cite)
    reporter.note("[dim]ask a question; /help for commands, Ctrl-D to leave[/]")
    ready_after = time.perf_counter() - process_started()
    try:
        run_loop(session, reporter, history_path=cache_dir() / HISTORY_FILE)
    finally:
        if timings:
            stderr.print(timings_line(session, ready_after), highlight=False, soft_wrap=True)
