"""The model side of `kvcli serve`: one loaded model, the cache manager, and the physical
copies its placement asks for (memory tiers hold caches on their device, the disk tier is
the kvcli store). No HTTP here: kvcli.serve.server puts this behind the JSON API, and tests
call it directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from kvcli import api
from kvcli.store import persist
from kvcli.api import Generation
from kvcli.compress.reading import Compressed
from kvcli.cache import CompressedCache, LayerCache
from kvcli.store.kvcfile import atomic_write, read_header, save_cache
from kvcli.documents import Document, PageSpan, load_document
from kvcli.errors import KvcliError
from kvcli.serve.manager import NOWHERE, CacheManager, CacheShape, Config, Entry
from kvcli.compress.methods import make_press
from kvcli.models import LoadedModel
from kvcli.serve.profiling import AgreementProfiler, press_for, quantized_copy
from kvcli.prompts import PromptLayout

DEFAULT_MAX_PENDING = 8  # requests running or queued for the model; the next gets 503
RECENT_QUESTIONS = 4  # users' questions kept per document as probes for its next profile
_HEX_ID = re.compile(r"[0-9a-f]{1,64}")


class Busy(KvcliError):
    """Too many requests waiting for the model (HTTP 503)."""


class NotFound(KvcliError):
    """An unknown cache id (HTTP 404)."""


def to_device(compressed: Compressed, device: torch.device) -> Compressed:
    """The same compressed document with its cache tensors on `device` (a no-op if there)."""
    cache = compressed.cache
    if cache.next_position.device == device:
        return compressed
    layers = [
        LayerCache(l.keys.to(device), l.values.to(device), l.positions.to(device), l.offsets.to(device), l.lengths.to(device))
        for l in cache.layers
    ]
    moved = CompressedCache(layers, cache.next_position.to(device), cache.original_length)
    return Compressed(
        cache=moved, layout=compressed.layout, press=compressed.press, agnostic=compressed.agnostic,
        document_tokens=compressed.document_tokens, source=compressed.source, kept=compressed.kept,
        progressive=compressed.progressive,
    )


def _writer_alive(temp_name: str) -> bool:
    """Whether the process named in a temp file `.NAME.tmp-PID-...` still runs (True if unsure)."""
    match = re.search(r"\.tmp-(\d+)", temp_name)
    if not match:
        return True
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def entry_id(model: LoadedModel, document_sha256: str) -> str:
    return hashlib.sha256(f"{model.fingerprint}:{document_sha256}".encode()).hexdigest()[:32]


class ModelService:
    """Model work behind one lock. The disk tier holds one .kvc per document (named by
    persist.store_key) plus a text sidecar, so a document can be compressed again after a
    restart.
    """

    def __init__(self, model: LoadedModel, manager: CacheManager, *, max_pending: int = DEFAULT_MAX_PENDING, profile: bool = True):
        self.model, self.manager = model, manager
        self.lock = threading.Lock()
        self.pending = 0
        self.max_pending = max_pending
        self._pending_lock = threading.Lock()
        self.documents: dict[str, Document] = {}
        self.memory: dict[str, tuple[int, str, Compressed]] = {}  # id -> (config, tier, compressed)
        self.disk: dict[str, tuple[int, Path]] = {}  # id -> (config, file)
        self.questions: dict[str, deque[str]] = {}  # id -> recent questions (probes of the next profile)
        self.asked_since_profile: set[str] = set()
        self.last_request = time.monotonic()
        if profile and manager.profiler is None:
            manager.profiler = AgreementProfiler(self)

    @classmethod
    def shape_of(cls, model: LoadedModel) -> CacheShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return CacheShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, torch.finfo(model.dtype).bits // 8)

    @property
    def store(self) -> Path:
        return persist.store_dir()

    @contextmanager
    def turn(self):
        """A place in the bounded queue, then the model: raises Busy when the queue is full."""
        with self._pending_lock:
            if self.pending >= self.max_pending:
                raise Busy(f"server busy: {self.pending} requests already waiting for the model; retry later")
            self.pending += 1
        try:
            with self.lock:
                yield
        finally:
            with self._pending_lock:
                self.pending -= 1
            self.last_request = time.monotonic()

    # ---- documents and entries ---------------------------------------------------------

    def document(self, body: dict) -> Document:
        path, text = body.get("document"), body.get("text")
        if (path is None) == (text is None):
            raise KvcliError("give exactly one of 'document' (a path) or 'text'")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise KvcliError("'document' must be a file path")
            return load_document(path, password=body_field(body, "password", str, None))
        if not isinstance(text, str):
            raise KvcliError("'text' must be a string")
        return load_document("-", stdin=io.BytesIO(text.encode("utf-8")))

    def _sidecar(self, eid: str) -> Path:
        return self.store / "documents" / f"{eid}.json"

    def entry_for(self, document: Document) -> Entry:
        """The manager's entry for this document, registered (with its text saved) on first sight."""
        eid = entry_id(self.model, document.sha256)
        entry = self.manager.entries.get(eid)
        known = self.documents.get(eid)
        saved = None
        if entry is None or not known or not known.text:
            pages = [[p.page, p.start, p.end] for p in document.pages]
            record = {"name": document.name, "sha256": document.sha256, "pages": pages, "text": document.text}
            try:
                sidecar = self._sidecar(eid)
                sidecar.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(sidecar, json.dumps(record).encode())
            except (OSError, KvcliError) as exc:  # e.g. a full disk: answering matters more than surviving a restart
                saved = f"could not save its text for a restart: {exc}"
            self.documents[eid] = document
        if entry is None:
            layout = PromptLayout.build(self.model.tokenizer, document.text, None)
            entry = Entry(eid, document.name, len(layout.document_ids), len(layout.prefix_ids))
            self.manager.add(entry, profile=False)  # profiled right after its first answer (after_request)
        if saved:
            self.manager.note(eid, saved)
        entry.recompressible = True
        return entry

    def recent_questions(self, eid: str) -> list[str]:
        return list(self.questions.get(eid, ()))

    # ---- physical placement --------------------------------------------------------------

    def _device(self, tier: str) -> torch.device:
        return torch.device("cuda") if tier == "gpu" else torch.device("cpu")

    def _read(self, entry: Entry, config: Config) -> tuple[Compressed, str]:
        """The entry's cache at config's method/ratio, from a copy we hold or from its text.

        Returns (compressed, the kv dtype already applied to it: "auto" when none).
        """
        configs = self.manager.configs
        for held in (self.memory.get(entry.id), self.disk.get(entry.id)):
            if not held:
                continue
            have = configs[held[0]]
            if (have.method, have.ratio) == (config.method, config.ratio) and have.kv_dtype in ("auto", config.kv_dtype):
                if isinstance(held[-1], Compressed):
                    return held[2], have.kv_dtype
                try:
                    return self._load(held[1]), have.kv_dtype
                except KvcliError:  # damaged on disk (the checksum caught it): useless, read again
                    self._forget_disk(entry.id)
        document = self.documents.get(entry.id)
        if document is None or not document.text:
            raise KvcliError(f"{entry.name}: its text is unknown; ask about the document again to re-read it")
        compressed = api.read(self.model, document, press_for(config), question=None)
        if compressed.prefill is not None:
            rate = compressed.prefill.prefill_seconds / max(1, compressed.cache.original_length)
            self.manager.prefill_seconds_per_token = 0.7 * self.manager.prefill_seconds_per_token + 0.3 * rate
        return compressed, "auto"

    def _load(self, path: Path) -> Compressed:
        started = time.perf_counter()
        compressed, _ = persist.load(self.model, path)
        seconds = time.perf_counter() - started
        disk = next((t for t in self.manager.tiers if t.encoded), None)
        if disk is not None and seconds > 0:  # what loading really costs: read + checksum + decode
            disk.bandwidth = 0.7 * disk.bandwidth + 0.3 * (path.stat().st_size / seconds)
        return compressed

    def _save(self, entry: Entry, config_index: int, compressed: Compressed) -> Path:
        config = self.manager.configs[config_index]
        document = self.documents.get(entry.id)
        press = press_for(config)
        path = self.store / f"{persist.store_key(self.model, document, press, config.kv_dtype)}.kvc"
        header = persist.header_for(self.model, document, compressed, config.kv_dtype)
        header["manager"] = {
            "entry": entry.id,
            "config": config.name,
            "quality": {self.manager.configs[i].name: q for i, q in entry.quality.items()},
            "profiled": entry.profiled,
        }
        self.store.mkdir(parents=True, exist_ok=True)
        save_cache(path, compressed.cache, header, kv_dtype=config.kv_dtype)
        return path

    def _forget_disk(self, eid: str) -> None:
        held = self.disk.pop(eid, None)
        if held:
            held[1].unlink(missing_ok=True)

    def materialize(self, entry: Entry) -> Compressed | None:
        """Make the physical copy match the entry's (config, tier); returns it for memory tiers.

        Loading into memory leaves the entry's file in place until `rebalance` has settled
        where it goes: demoted back unchanged, it costs no write, and a crash meanwhile
        loses nothing.
        """
        eid, index, tier = entry.id, entry.config, entry.tier
        config = self.manager.configs[index]
        if tier == NOWHERE:
            self.memory.pop(eid, None)
            self._forget_disk(eid)
            return None
        target = self.manager.tier(tier)
        if target.encoded:
            if not (eid in self.disk and self.disk[eid][0] == index):
                compressed, _ = self._read(entry, config)
                old = self.disk.get(eid)
                path = self._save(entry, index, compressed)
                if old and old[1] != path:
                    old[1].unlink(missing_ok=True)
                self.disk[eid] = (index, path)
            self.memory.pop(eid, None)
            return None
        held = self.memory.get(eid)
        if held and held[0] == index:
            compressed = held[2]
        else:
            source, applied = self._read(entry, config)
            compressed = source if applied == config.kv_dtype else quantized_copy(source, config.kv_dtype)
        compressed = to_device(compressed, self._device(tier))
        self.memory[eid] = (index, tier, compressed)
        return compressed

    def rebalance(self) -> None:
        """Resolve overflows, apply every placement that changed (a failed one falls back to
        the copy still held), then delete the files of entries now held in memory."""
        self.manager.resolve()
        order = {t.name: i for i, t in enumerate(self.manager.tiers)}
        pending = sorted(self.manager.entries.values(), key=lambda e: -order.get(e.tier, len(order)))
        for entry in pending:  # lowest targets first: free memory before filling it
            try:
                self.materialize(entry)
            except KvcliError as exc:
                self._fall_back(entry, f"could not keep it as {self.manager.configs[entry.config].name} on {entry.tier}: {exc}")
        encoded = {t.name for t in self.manager.tiers if t.encoded}
        for eid in [eid for eid in self.disk if getattr(self.manager.entries.get(eid), "tier", None) not in encoded]:
            self._forget_disk(eid)

    def _fall_back(self, entry: Entry, reason: str) -> None:
        """A placement failed (a full disk, a text no longer known): keep the copy still held.

        A file already on disk stays, whole (writes are atomic), and the entry points at it
        again; with none, a memory copy is released and the entry is held nowhere.
        """
        self.memory.pop(entry.id, None)
        disk = next((t.name for t in self.manager.tiers if t.encoded), None)
        held = self.disk.get(entry.id)
        if held and held[1].is_file() and disk is not None:
            self.manager.fail(entry.id, held[0], disk, f"{reason}; kept its file {held[1].name}")
        else:
            self.disk.pop(entry.id, None)
            self.manager.fail(entry.id, 0, NOWHERE, reason)

    # ---- restart: the disk tier is found again --------------------------------------------

    def rediscover(self) -> int:
        """Adopt the store's .kvc files made by this model in a known configuration."""
        names = {c.name: i for i, c in enumerate(self.manager.configs)}
        compute = str(self.model.dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")
        adopted = 0
        for path in sorted(self.store.glob("*.kvc")):
            try:
                header = read_header(path)
            except KvcliError:
                continue  # unreadable: `kvcli cache list` shows it, we do not touch it
            if header.get("model", {}).get("fingerprint") != self.model.fingerprint:
                continue
            method = header.get("method", {})
            kv = "auto" if header.get("kv_dtype") == compute else header.get("kv_dtype")
            ratio = 1.0 if method.get("method") == "full" else method.get("ratio")
            if ratio is None:
                continue
            name = Config(method.get("method"), float(ratio), kv).name
            managed = header.get("manager", {}) if isinstance(header.get("manager"), dict) else {}
            index = names.get(managed.get("config", name), names.get(name))
            if index is None:
                continue
            doc = header["document"]
            eid = entry_id(self.model, doc["sha256"])
            if eid in self.disk:  # two copies: a kill between writing one and deleting the other
                keep, spare = sorted([self.disk[eid], (index, path)], key=lambda held: held[0])  # lighter first
                self._delete_if_managed(spare[1])
                if keep[1] != path:
                    continue
                self.manager.entries.pop(eid, None)  # adopt this lighter copy instead
                adopted -= 1
            self.documents[eid] = self._document_from(eid, doc)
            entry = Entry(eid, doc["name"], int(doc["tokens"]), len(header.get("prefix_ids", [])))
            entry.recompressible = bool(self.documents[eid].text)
            quality = managed.get("quality", {})
            entry.quality = {names[n]: float(q) for n, q in quality.items() if n in names}
            entry.profiled = bool(managed.get("profiled")) and bool(entry.quality)
            self.manager.add(entry, profile=False)
            self.manager.place(eid, index, next(t.name for t in self.manager.tiers if t.encoded), f"found {path.name} in the store at startup")
            self.disk[eid] = (index, path)
            adopted += 1
        self._sweep()
        self.rebalance()  # the disk tier may be smaller than last time
        return adopted

    def _delete_if_managed(self, path: Path) -> None:
        """Remove a redundant copy this server wrote; files of `kvcli ask --reuse` stay."""
        try:
            if isinstance(read_header(path).get("manager"), dict):
                path.unlink(missing_ok=True)
        except KvcliError:
            pass

    def _document_from(self, eid: str, doc: dict) -> Document:
        sidecar = self._sidecar(eid)
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            return Document(record["name"], record["text"], record["sha256"], [PageSpan(*p) for p in record["pages"]])
        except (OSError, ValueError, KeyError, TypeError):
            pages = [PageSpan(*p) for p in doc.get("pages", [])] or [PageSpan(1, 0, 0)]
            return Document(doc["name"], "", doc["sha256"], pages)

    def _sweep(self, older_than: float = 3600.0) -> None:
        """At startup: temp files of writes killed mid-way (their writer, the pid in the name, is
        gone, or they are an hour old; never under a .kvc name, so nothing loaded them), and the
        texts of documents with no cache left on disk (the next question sends the text again)."""
        for tmp in [*self.store.glob(".*.tmp-*"), *(self.store / "documents").glob(".*.tmp-*")]:
            try:
                if not _writer_alive(tmp.name) or time.time() - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
            except OSError:
                pass
        for sidecar in (self.store / "documents").glob("*.json"):
            if sidecar.stem not in self.disk:
                sidecar.unlink(missing_ok=True)

    # ---- requests (call inside `turn()`) ---------------------------------------------------

    def ask(self, body: dict, on_text: Callable[[int, str], None] | None) -> dict:
        """Answer; call `after_request` once the reply is sent (it profiles and rebalances)."""
        questions = body.get("questions", [body["question"]] if "question" in body else None)
        if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise KvcliError("give 'question' (a string) or 'questions' (a list of strings)")
        generation = Generation(
            max_new_tokens=body_field(body, "max_new_tokens", int, api.DEFAULT_MAX_NEW_TOKENS),
            temperature=body_field(body, "temperature", float, 0.0),
            seed=body_field(body, "seed", int, None),
        )
        started = time.perf_counter()
        path = body.get("document")
        if isinstance(path, str) and persist.is_cache_file(path):
            compressed, header = persist.load(self.model, path)
            answers = api.answer(self.model, compressed, questions, generation, on_text=on_text, started=started)
            return self._report(answers, compressed, {"served_from": "file"}, header["document"])
        document = self.document(body)
        if not body_field(body, "reuse", bool, True):
            press = _press(body, "ada-snapkv")
            aware = len(questions) == 1 and not body_field(body, "agnostic", bool, False)
            compressed = api.read(self.model, document, press, question=questions[0] if aware else None, headroom_tokens=generation.max_new_tokens)
            answers = api.answer(self.model, compressed, questions, generation, on_text=on_text, started=started)
            return self._report(answers, compressed, {"served_from": "text"}, api.document_info(document))
        entry = self.entry_for(document)
        entry, served_from, served_config = self.manager.access(entry.id)
        self.questions.setdefault(entry.id, deque(maxlen=RECENT_QUESTIONS)).extend(questions)
        self.asked_since_profile.add(entry.id)
        try:
            compressed = self.materialize(entry)
        except KvcliError:
            self.rebalance()
            raise
        loaded = time.perf_counter()
        answers = api.answer(self.model, compressed, questions, generation, on_text=on_text, started=started)
        placement = {
            "served_from": served_from,
            "config": self.manager.configs[served_config if served_from != NOWHERE else 0].name,
            "load_seconds": round(loaded - started, 4),
        }
        return self._report(answers, compressed, placement, api.document_info(document))

    def _report(self, answers: list[api.Answer], compressed: Compressed, placement: dict, document: dict) -> dict:
        first = answers[0]
        stats = compressed.stats()
        return {
            "done": True,
            "answer": first.answer,
            "answers": [{"question": a.question, "answer": a.answer, "tokens": a.tokens} for a in answers],
            "model": {"name": self.model.name, "device": str(self.model.device)},
            "document": {"name": document["name"], "sha256": document["sha256"], "tokens": compressed.document_tokens},
            "timings": {
                "ttft_seconds": round(first.ttft_seconds, 4),
                "decode_tokens_per_second": round(first.decode_tokens_per_second, 2),
                "prefill_seconds": round(compressed.prefill.prefill_seconds, 4) if compressed.prefill else 0.0,
                "new_tokens": first.tokens,
                **placement,
            },
            "cache": {k: stats[k] for k in ("method", "ratio", "kept_fraction", "compressed_bytes", "document_tokens")},
        }

    def compress(self, body: dict) -> dict:
        """Write a .kvc (with 'output') or add the document to the manager (call `after_request`)."""
        document = self.document(body)
        output = body_field(body, "output", str, None)
        if output is None:
            entry = self.entry_for(document)
            self.manager.access(entry.id)
            try:
                self.materialize(entry)
            finally:
                self.rebalance()
            return {"entry": next(r for r in self.manager.listing() if r["id"] == entry.id)}
        if not output.endswith(".kvc"):
            raise KvcliError(f"'output' must be a path ending in .kvc (got {output[:200]!r})")
        compressed, written = persist.compress(self.model, document, _press(body, "kvzip"), output, kv_dtype=body_field(body, "kv_dtype", str, "auto"))
        return {"output": output, "bytes": written, "document": api.document_info(document), "cache": compressed.stats()}

    def after_request(self) -> None:
        """Once a reply is out: profile documents added since ("profiled when added"), then
        settle placement (overflows resolved, files written), off the request's critical path."""
        if self.manager.profiler is not None:
            fresh = [e for e in list(self.manager.entries.values()) if not e.profiled and self.documents.get(e.id) and self.documents[e.id].text]
            for entry in fresh:
                self.asked_since_profile.discard(entry.id)  # its questions so far are among the probes
                try:
                    self.manager.profile(entry)
                except KvcliError as exc:
                    self.manager.note(entry.id, f"profiling failed: {exc}")
        self.rebalance()

    def remove(self, prefix: str) -> list[str]:
        if not _HEX_ID.fullmatch(prefix):
            raise KvcliError(f"invalid cache id {prefix[:80]!r}: ids are hexadecimal (see GET /caches)")
        matches = [eid for eid in self.manager.entries if eid.startswith(prefix)]
        if not matches:
            raise NotFound(f"no cache with id {prefix}")
        if len(matches) > 1:
            raise KvcliError(f"cache id {prefix} is ambiguous ({len(matches)} matches); give more characters")
        (eid,) = matches
        self._forget(eid)
        return [eid]

    def clear(self) -> list[str]:
        """Remove every managed cache (files of other tools in the store are left alone)."""
        removed = list(self.manager.entries)
        for eid in removed:
            self._forget(eid)
        return removed

    def _forget(self, eid: str) -> None:
        self.manager.remove(eid)
        self.memory.pop(eid, None)
        self._forget_disk(eid)
        self.documents.pop(eid, None)
        self.questions.pop(eid, None)
        self.asked_since_profile.discard(eid)
        self._sidecar(eid).unlink(missing_ok=True)

    def stop(self) -> int:
        """Before exiting: write what memory holds to the disk tier, so a restart finds it.

        Returns how many documents are on disk afterwards.
        """
        with self.lock:
            self.manager.store_memory("the server is stopping: memory tiers are written to disk")
            self.rebalance()
            return len(self.disk)

    def profile_idle(self, idle_seconds: float = 30.0, stale_seconds: float = 3600.0) -> str | None:
        """When nobody has asked for `idle_seconds`, (re)profile one entry: never profiled,
        asked new questions since its profile (they become probes), or stale. Returns its id."""
        if self.manager.profiler is None or time.monotonic() - self.last_request < idle_seconds:
            return None
        if not self.lock.acquire(blocking=False):
            return None
        try:
            now = self.manager.clock()
            due = [e for e in list(self.manager.entries.values()) if self.documents.get(e.id) and self.documents[e.id].text
                   and (not e.profiled or e.id in self.asked_since_profile or now - e.profiled_at > stale_seconds)]
            if not due:
                return None
            entry = min(due, key=lambda e: (e.profiled, e.profiled_at))
            self.asked_since_profile.discard(entry.id)
            self.manager.profile(entry)
            self.rebalance()
            return entry.id
        finally:
            self.lock.release()


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def body_field(body: dict, key: str, kind: type, default):
    """body[key] checked to be of `kind` (null or absent: `default`); a wrong type is a 400."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise KvcliError(f"'{key}' must be {_KINDS[kind]}")
    return float(value) if kind is float else value


def _press(body: dict, default_method: str):
    return make_press(
        body_field(body, "method", str, default_method), ratio=body_field(body, "ratio", float, None), budget=body_field(body, "budget", int, None)
    )
