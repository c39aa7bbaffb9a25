"""The model side of `kvcli serve`: one loaded model, the cache manager, and the physical
copies its placement asks for (memory tiers hold caches on their device, the disk tier is
the kvcli store). No HTTP here: kvcli.serve.server checks request bodies into the typed
requests of kvcli.serve.requests and puts this behind the JSON API; tests call it directly.

Concurrency: `reserve` takes a place in the bounded queue (or raises Busy), `lock` is the
model's turn (a kvcli.serve.busy.BusyLock: the share of time it is held weighs delay in the
placement's utility). A request reads its document (`read_document`) after reserving and before
taking the lock, so a slow or stuck file never holds the model.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from kvcli import api
from kvcli.store import persist
from kvcli.api import Generation
from kvcli.compress.pipeline import derivable
from kvcli.compress.reading import Compressed
from kvcli.cache import CompressedCache, LayerCache
from kvcli.store.header import DocumentInfo, KvcHeader
from kvcli.store.kvcfile import atomic_write, pid_alive, prepare_staging, read_header, save_cache
from kvcli.documents import Document, PageSpan, load_document
from kvcli.errors import KvcliError
from kvcli.serve.busy import BusyLock
from kvcli.serve.manager import NOWHERE, CacheManager, CacheShape, Config, Entry
from kvcli.compress.methods import make_press
from kvcli.models import LoadedModel
from kvcli.serve.profiling import AgreementProfiler, from_reads, press_for, quantized_copy
from kvcli.serve.requests import AskRequest, CompressRequest, DocumentSource
from kvcli.prompts import PromptLayout

DEFAULT_MAX_PENDING = 8  # requests running or queued for the model; the next gets 503
RECENT_QUESTIONS = 4  # users' questions kept per document as probes for its next profile
SET_ASIDE = "set-aside"  # store subfolder where unreadable files found at startup are moved
_HEX_ID = re.compile(r"[0-9a-f]{1,64}")


def _accounted(kind: str):
    """A ModelService method whose time goes to `work_seconds[kind]` (see `_work`)."""

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self._work(kind):
                return method(self, *args, **kwargs)

        return run

    return decorate


class Busy(KvcliError):
    """Too many requests waiting for the model (HTTP 503)."""


class NotFound(KvcliError):
    """An unknown cache id (HTTP 404)."""


def to_device(compressed: Compressed, device: torch.device) -> Compressed:
    """The same compressed document with its cache tensors on `device` (a no-op if there).

    Everything else is kept: the read's timings (what `--json` reports as prefill_seconds)
    with its cache pointing at the moved one, so the old device's copy can be freed."""
    cache = compressed.cache
    if cache.next_position.device == device:
        return compressed
    layers = [
        LayerCache(l.keys.to(device), l.values.to(device), l.positions.to(device), l.offsets.to(device), l.lengths.to(device))
        for l in cache.layers
    ]
    moved = CompressedCache(layers, cache.next_position.to(device), cache.original_length, cache.scores)  # scores stay on the CPU
    prefill = compressed.prefill
    if prefill is not None:
        prefill = replace(prefill, cache=moved, last_logits=prefill.last_logits.to(device))
    logits = compressed.first_logits
    return replace(compressed, cache=moved, prefill=prefill, first_logits=None if logits is None else logits.to(device))


def _writer_alive(temp_name: str) -> bool:
    """Whether the process named in a temp file `.NAME.tmp-PID-...` still runs (True if unsure)."""
    match = re.search(r"\.tmp-(\d+)", temp_name)
    return True if not match else pid_alive(int(match.group(1)))


def entry_id(model: LoadedModel, document_sha256: str) -> str:
    return hashlib.sha256(f"{model.fingerprint}:{document_sha256}".encode()).hexdigest()[:32]


class ModelService:
    """Model work behind one lock. The disk tier holds one .kvc per document (named by
    persist.store_key) plus a text sidecar, so a document can be compressed again after a
    restart.
    """

    def __init__(self, model: LoadedModel, manager: CacheManager, *, max_pending: int = DEFAULT_MAX_PENDING, profile: bool = True,
                 shared_store: bool = False):
        """`shared_store`: other services (kvcli.serve.replicas) save to the same store, so a
        document met for the first time is first looked for there (see `entry_for`)."""
        self.model, self.manager = model, manager
        self.shared_store = shared_store
        self.lock = BusyLock()  # the model's turn; how long it is held is the model's utilization
        self.pending = 0
        self.max_pending = max_pending
        self._pending_lock = threading.Lock()
        self.documents: dict[str, Document] = {}
        self.memory: dict[str, tuple[int, str, Compressed]] = {}  # id -> (config, tier, compressed)
        self.disk: dict[str, tuple[int, Path]] = {}  # id -> (config, file)
        self.questions: dict[str, deque[str]] = {}  # id -> recent questions (probes of the next profile)
        self.asked_since_profile: set[str] = set()
        self.last_request = time.monotonic()
        self.warnings: list[str] = []  # for the operator (kvcli serve prints them): e.g. files set aside
        # How placement got each cache it did not already hold: "read" (the
        # document read with the model), "derived" (selected from a lighter copy by its scores,
        # no model pass), "loaded" (a file of the disk tier read back).
        self.placement_work = {"read": 0, "derived": 0, "loaded": 0, "profiled": 0}
        # Seconds the model's turn went to each kind of work (nested work counted once, in the
        # innermost kind): what a busy model is busy with (GET /health).
        self.work_seconds = {"requests": 0.0, "placement": 0.0, "profiling": 0.0}
        self._work_stack: list[float] = []
        # The profiler's reads of entries profiled in this after_request, {id: {(method, ratio):
        # Compressed}}, for the rebalance right after it ("profiled": a move took one, no read).
        self._profiled_reads: dict[str, dict] = {}
        if profile and manager.profiler is None:
            manager.profiler = self.profiler()
        if model.device.type == "cuda":  # the disk tier's loads stream through it: page-locked now, not by the first
            prepare_staging(model.device)
        self._scored_files: set[Path] = set()  # disk files holding their rows' selection scores
        manager.derivable = self._derivable_step

    @contextmanager
    def _work(self, kind: str):
        """Account the time inside to `kind`, less the nested work accounted to its own kind."""
        started = time.perf_counter()
        self._work_stack.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.work_seconds[kind] += spent - self._work_stack.pop()
            if self._work_stack:
                self._work_stack[-1] += spent

    def warn(self, message: str, keep: int = 100) -> None:
        self.warnings.append(message)
        del self.warnings[:-keep]

    def profiler(self, **options) -> AgreementProfiler:
        """An AgreementProfiler over this service's model, configurations, texts and users' questions."""
        return AgreementProfiler(
            self.model, self.manager.configs, documents=self.known_text, recent_questions=self.recent_questions, **options
        )

    def known_text(self, eid: str) -> Document | None:
        document = self.documents.get(eid)
        return document if document is not None and document.text else None

    @classmethod
    def shape_of(cls, model: LoadedModel) -> CacheShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return CacheShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, torch.finfo(model.dtype).bits // 8)

    @property
    def store(self) -> Path:
        return persist.store_dir()

    def reserve(self) -> None:
        """A place in the bounded queue of requests for the model: raises Busy when it is full."""
        with self._pending_lock:
            if self.pending >= self.max_pending:
                raise Busy(f"server busy: {self.pending} requests already waiting for the model; retry later")
            self.pending += 1

    def others_waiting(self) -> bool:
        """Whether requests besides the one holding the model wait for it (call inside `turn()`)."""
        with self._pending_lock:
            return self.pending > 1

    def release(self) -> None:
        with self._pending_lock:
            self.pending -= 1
        self.last_request = time.monotonic()

    @contextmanager
    def turn(self):
        """A place in the bounded queue, then the model: raises Busy when the queue is full."""
        self.reserve()
        try:
            with self.lock:
                yield
        finally:
            self.release()

    # ---- documents and entries ---------------------------------------------------------

    @staticmethod
    def read_document(source: DocumentSource) -> Document | None:
        """The request's document, read and parsed (call it before taking the model's lock).

        None for a .kvc path: `ask` answers from that file.
        """
        if source.path is not None:
            if persist.is_cache_file(source.path):
                return None
            return load_document(source.path, password=source.password)
        return load_document("-", stdin=io.BytesIO(source.text.encode("utf-8")))

    def _sidecar(self, eid: str) -> Path:
        return self.store / "documents" / f"{eid}.json"

    def entry_for(self, document: Document) -> Entry:
        """The manager's entry for this document, registered (with its text saved) on first sight."""
        eid = entry_id(self.model, document.sha256)
        entry = self.manager.entries.get(eid)
        if entry is None and self.shared_store:
            entry = self._adopt_saved(document, eid)
        known = self.documents.get(eid)
        saved = None
        if entry is None or not known or not known.text:
            pages = [[p.page, p.start, p.end] for p in document.pages]
            record = {"name": document.name, "sha256": document.sha256, "pages": pages, "text": document.text}
            try:
                sidecar = self._sidecar(eid)
                persist.ensure_store_dir()
                sidecar.parent.mkdir(mode=persist.STORE_DIR_MODE, exist_ok=True)
                atomic_write(sidecar, json.dumps(record).encode(), mode=persist.STORE_FILE_MODE)
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
        """The entry's cache at config's method/ratio: a copy we hold; else selected from a
        lighter copy we hold by its scores (`_derive`: no model pass); else read from its text.

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
        derived = self._derive(entry, config)
        if derived is not None:
            return derived
        profiled = self._from_profile(entry, config)
        if profiled is not None:
            return profiled, "auto"
        document = self.documents.get(entry.id)
        if document is None or not document.text:
            raise KvcliError(f"{entry.name}: its text is unknown; ask about the document again to re-read it")
        self.placement_work["read"] += 1
        compressed = api.read(self.model, document, press_for(config), question=None)
        if compressed.prefill is not None:
            rate = compressed.prefill.prefill_seconds / max(1, compressed.cache.original_length)
            self.manager.prefill_seconds_per_token = 0.7 * self.manager.prefill_seconds_per_token + 0.3 * rate
        return compressed, "auto"

    def _from_profile(self, entry: Entry, config: Config) -> Compressed | None:
        """config's cache from the reads the profiler just made of this entry: the very read,
        or selected from a lighter one of the same method by its scores; None otherwise."""
        found = from_reads(self._profiled_reads.get(entry.id, {}), config)
        if found is not None:
            self.placement_work["profiled"] += 1
        return found

    def _derive(self, entry: Entry, config: Config) -> tuple[Compressed, str] | None:
        """config's cache selected from a lighter copy held (memory first, then disk) by the
        scores it was compressed with, exactly what reading again would keep
        (kvcli.compress.pipeline.derive), with no model pass; None when no copy allows it (a
        full cache, no scores recorded: an older file or a progressive read; another method,
        or one whose allocation is not nested), and then the caller reads the text again.

        Only from a copy in the compute dtype or in config's own kv dtype, as `_read` takes
        an exact copy: int8 rows are never rounded again to int4. Returns (compressed, the kv
        dtype already applied to it)."""
        configs = self.manager.configs
        target = press_for(config)
        for held in (self.memory.get(entry.id), self.disk.get(entry.id)):
            if not held:
                continue
            have = configs[held[0]]
            if have.method != config.method or not have.ratio > config.ratio or have.kv_dtype not in ("auto", config.kv_dtype):
                continue
            if not derivable(press_for(have), target):
                continue
            if isinstance(held[-1], Compressed):
                source = held[2]
            else:
                try:
                    source = self._load(held[1])
                except KvcliError:  # damaged on disk: useless
                    self._forget_disk(entry.id)
                    continue
            compressed = source.derive(target)
            if compressed is None:
                continue
            self.placement_work["derived"] += 1
            return compressed, have.kv_dtype
        return None

    def _load(self, path: Path) -> Compressed:
        started = time.perf_counter()
        self.placement_work["loaded"] += 1
        compressed, _ = persist.load(self.model, path, scores=True)
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
        persist.ensure_store_dir()
        # with its scores: compressed further on disk later, it is selected, not read again
        save_cache(path, compressed.cache, header, kv_dtype=config.kv_dtype, mode=persist.STORE_FILE_MODE, scores=True)
        if compressed.cache.scores is not None:
            self._scored_files.add(path)
        return path

    def _forget_disk(self, eid: str) -> None:
        held = self.disk.pop(eid, None)
        if held:
            held[1].unlink(missing_ok=True)
            self._scored_files.discard(held[1])

    def _derivable_step(self, entry: Entry, held: int, step: int) -> bool:
        """Whether config `step` is selected from the copy held of `entry` (config `held`, in
        memory or on disk, with its selection scores) with no model pass: what lets an entry
        whose text is unknown (adopted from the store) be compressed further, not only dropped."""
        configs = self.manager.configs
        have, want = configs[held], configs[step]
        if not want.ratio < have.ratio or have.kv_dtype not in ("auto", want.kv_dtype):
            return False
        if not derivable(press_for(have), press_for(want)):
            return False
        memory = self.memory.get(entry.id)
        if memory and memory[0] == held:
            return memory[2].cache.scores is not None
        disk = self.disk.get(entry.id)
        return bool(disk) and disk[0] == held and disk[1] in self._scored_files

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
            if compressed is not source:  # rounding the rows leaves their selection scores as they were
                compressed.cache.scores = source.cache.scores
        compressed = to_device(compressed, self._device(tier))
        self.memory[eid] = (index, tier, compressed)
        return compressed

    @_accounted("placement")
    def rebalance(self) -> None:
        """Resolve overflows, apply every placement that changed (a failed one falls back to
        the copy still held), then trim the files kept of entries now held in memory."""
        self.manager.utilization = self.lock.utilization()  # delay weighs more on a busy model
        self.manager.resolve()
        order = {t.name: i for i, t in enumerate(self.manager.tiers)}
        pending = sorted(self.manager.entries.values(), key=lambda e: -order.get(e.tier, len(order)))
        for entry in pending:  # lowest targets first: free memory before filling it
            try:
                self.materialize(entry)
            except KvcliError as exc:
                self._fall_back(entry, f"could not keep it as {self.manager.configs[entry.config].name} on {entry.tier}: {exc}")
        self._trim_clean_copies()

    def _trim_clean_copies(self) -> None:
        """Keep the files of entries now held in memory while the disk tier has room for them
        beside the entries it holds: a clean copy, so demoting the entry back unchanged costs
        no write (under LRU-like churn every demotion was a write, on the model's turn). The
        least recently used copies go first when the files would pass the tier's capacity."""
        disk = next((t for t in self.manager.tiers if t.encoded), None)
        entries = self.manager.entries
        encoded = {t.name for t in self.manager.tiers if t.encoded}
        if disk is None:  # no disk tier: nothing is ever written
            return
        clean = [eid for eid in self.disk if getattr(entries.get(eid), "tier", None) not in encoded]
        sizes = {eid: self.manager.size(entries[eid], index, disk.name) if eid in entries else 0 for eid, (index, _) in self.disk.items()}
        used = sum(sizes.values())
        for eid in sorted(clean, key=lambda e: (e in entries, getattr(entries.get(e), "last_access", 0.0))):
            if used <= disk.capacity and eid in entries:
                break
            used -= sizes[eid]
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
        """Adopt the store's .kvc files made by this model in a known configuration.

        A file whose header cannot be read or lacks what adoption needs (damaged, nested too
        deeply, fields missing or mistyped) is moved to the store's `set-aside` folder with a
        warning in `self.warnings`: one bad file never stops the server from starting, and
        nothing is deleted.
        """
        names = {c.name: i for i, c in enumerate(self.manager.configs)}
        adopted = 0
        for path in sorted(self.store.glob("*.kvc")):
            try:
                found = self._adoptable(path, names)
            except (KvcliError, KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError) as exc:
                self._set_aside(path, exc)
                continue
            if found is None:
                continue  # another model's, or a configuration this server does not use
            eid, index, header = found
            if eid in self.disk:  # two copies: a kill between writing one and deleting the other
                keep, spare = sorted([self.disk[eid], (index, path)], key=lambda held: held[0])  # lighter first
                self._delete_if_managed(spare[1])
                if keep[1] != path:
                    continue
                self.manager.entries.pop(eid, None)  # adopt this lighter copy instead
                adopted -= 1
            self._adopt(path, eid, index, header, f"found {path.name} in the store at startup")
            adopted += 1
        self._sweep()
        self.rebalance()  # the disk tier may be smaller than last time
        return adopted

    def _adopt(self, path: Path, eid: str, index: int, header: KvcHeader, reason: str) -> Entry:
        """Register the document of a store file, held on the disk tier in configuration `index`."""
        names = {c.name: i for i, c in enumerate(self.manager.configs)}
        doc, managed = header.document, header.manager or {}
        self.documents[eid] = self._document_from(eid, doc)
        entry = Entry(eid, doc.name, doc.tokens, len(header.prefix_ids))
        entry.recompressible = bool(self.documents[eid].text)
        quality = managed.get("quality", {})
        entry.quality = {names[n]: float(q) for n, q in quality.items() if n in names}
        entry.profiled = bool(managed.get("profiled")) and bool(entry.quality)
        self.manager.add(entry, profile=False)
        self.manager.place(eid, index, next(t.name for t in self.manager.tiers if t.encoded), reason)
        self.disk[eid] = (index, path)
        if header.scores is not None:
            self._scored_files.add(path)
        return entry

    def _adopt_saved(self, document: Document, eid: str) -> Entry | None:
        """The lightest file of `document` another service saved in the shared store (its name
        is the store key of each configuration), adopted onto the disk tier; None if none is."""
        names = {c.name: i for i, c in enumerate(self.manager.configs)}
        if next((t for t in self.manager.tiers if t.encoded), None) is None:
            return None
        for config in self.manager.configs:
            path = self.store / f"{persist.store_key(self.model, document, press_for(config), config.kv_dtype)}.kvc"
            if not path.is_file():
                continue
            try:
                found = self._adoptable(path, names)
            except (KvcliError, KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError):
                continue  # damaged, or not what its name says: the text is read again instead
            if found is not None and found[0] == eid:
                return self._adopt(path, eid, found[1], found[2], f"found {path.name} in the shared store")
        return None

    def _adoptable(self, path: Path, names: dict[str, int]) -> tuple[str, int, KvcHeader] | None:
        """(entry id, config index, header) of a store file this server can adopt, None if it
        is not one of its (another model, a bare cache, another configuration); raises if the
        header is bad (read_header checks every field it types; `manager` is ours to check)."""
        header = read_header(path)
        if header.model is None or header.model.fingerprint != self.model.fingerprint:
            return None
        if header.document is None or header.method is None or header.prefix_ids is None:
            return None
        compute = str(self.model.dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")
        method = header.method
        kv = "auto" if header.kv_dtype == compute else header.kv_dtype
        ratio = 1.0 if method.method == "full" else method.ratio
        if ratio is None:
            return None
        name = Config(method.method, float(ratio), kv).name
        managed = header.manager or {}
        config = managed.get("config", name)
        quality = managed.get("quality", {})
        if not isinstance(config, str) or not isinstance(quality, dict) or not all(
            isinstance(q, (int, float)) and not isinstance(q, bool) and 0.0 <= q <= 1.0 for q in quality.values()
        ):
            raise KvcliError("its server bookkeeping (header field manager) is malformed")
        index = names.get(config, names.get(name))
        if index is None:
            return None
        return entry_id(self.model, header.document.sha256), index, header

    def _set_aside(self, path: Path, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, KvcliError) else f"its header is unusable ({type(exc).__name__}: {exc})"
        target = self.store / SET_ASIDE / path.name
        try:
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, target)
        except OSError as error:
            self.warn(f"{path.name} in the store is unusable ({reason[:300]}) and could not be set aside: {error.strerror or error}")
            return
        self.warn(f"set aside {path.name} (moved to {target}): {reason[:300]}")

    def _delete_if_managed(self, path: Path) -> None:
        """Remove a redundant copy this server wrote; files of `kvcli ask --reuse` stay."""
        try:
            if read_header(path).manager is not None:
                path.unlink(missing_ok=True)
        except KvcliError:
            pass

    def _document_from(self, eid: str, doc: DocumentInfo) -> Document:
        """The document of a file found at startup: its text from the sidecar (if it is there,
        readable and of this very document), else only what the header says (no text)."""
        sidecar = self._sidecar(eid)
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            if record["sha256"] == doc.sha256 and isinstance(record["text"], str):
                return Document(record["name"], record["text"], record["sha256"], [PageSpan(*p) for p in record["pages"]])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass
        return Document(doc.name, "", doc.sha256, [PageSpan(*p) for p in doc.pages] or [PageSpan(1, 0, 0)])

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

    @_accounted("requests")
    def ask(self, request: AskRequest, document: Document | None, on_text: Callable[[int, str], None] | None) -> dict:
        """Answer `request` about `document` (from `read_document`; None: its .kvc file).

        Call inside `turn()`, then `after_request` once the reply is sent (it profiles and
        rebalances). Returns the "done" event: {"done", "answer" (the first), "answers" (one
        kvcli.api.report record per question, the shape of `kvcli ask --json`), "placement"}.
        """
        generation = Generation(max_new_tokens=request.max_new_tokens, temperature=request.temperature, seed=request.seed)
        started = time.perf_counter()
        if document is None:
            compressed, header = persist.load(self.model, request.source.path)
            answers = self._answer(compressed, request.questions, generation, on_text, started, cite=request.cite)
            return self._report(answers, compressed, {"served_from": "file"}, header.document.as_dict())
        if not request.reuse:
            press = make_press(request.method, ratio=request.ratio, budget=request.budget)
            aware = len(request.questions) == 1 and not request.agnostic
            compressed = api.read(
                self.model, document, press, question=request.questions[0] if aware else None, headroom_tokens=generation.max_new_tokens
            )
            answers = self._answer(compressed, request.questions, generation, on_text, started, cite=request.cite)
            return self._report(answers, compressed, {"served_from": "text"}, api.document_info(document))
        entry = self.entry_for(document)
        entry, served_from, served_config = self.manager.access(entry.id)
        self.questions.setdefault(entry.id, deque(maxlen=RECENT_QUESTIONS)).extend(request.questions)
        self.asked_since_profile.add(entry.id)
        try:
            compressed = self.materialize(entry)
        except KvcliError:
            self.rebalance()
            raise
        loaded = time.perf_counter()
        answers = self._answer(compressed, request.questions, generation, on_text, started, cite=request.cite)
        placement = {
            "served_from": served_from,
            "config": self.manager.configs[served_config if served_from != NOWHERE else 0].name,
            "load_seconds": round(loaded - started, 4),
        }
        return self._report(answers, compressed, placement, api.document_info(document))

    def _answer(self, compressed: Compressed, questions, generation: Generation, on_text, started: float, *, cite: bool = False) -> list[api.Answer]:
        """One question after another over the one cache: each decodes on a single working
        copy, released before the next, so memory does not grow with the number of questions
        (a batch would hold one copy per question)."""
        answers = []
        for index, question in enumerate(questions):
            emit = None if on_text is None else (lambda _, text, index=index: on_text(index, text))
            answers.extend(api.answer(self.model, compressed, [question], generation, on_text=emit, started=started, cite=cite))
        return answers

    def _report(self, answers: list[api.Answer], compressed: Compressed, placement: dict, document: dict) -> dict:
        records = [api.report(self.model, document, compressed, a) for a in answers]
        for record in records:  # what `kvcli ask --json` adds to api.report (kvcli.cli.main); the client adds its wall time
            record["precision"] = self.model.precision.describe()
        return {"done": True, "answer": answers[0].answer, "answers": records, "placement": placement}

    @_accounted("requests")
    def compress(self, request: CompressRequest, document: Document | None) -> dict:
        """Write a .kvc (with `output`) or add the document to the manager (call `after_request`)."""
        if document is None:
            raise KvcliError(f"{request.source.path[:200]} is already a compressed cache; give the document itself")
        if request.output is None:
            entry = self.entry_for(document)
            self.manager.access(entry.id)
            try:
                self.materialize(entry)
            finally:
                self.rebalance()
            return {"entry": next(r for r in self.manager.listing() if r["id"] == entry.id)}
        press = make_press(request.method, ratio=request.ratio, budget=request.budget)
        compressed, written = persist.compress(self.model, document, press, request.output, kv_dtype=request.kv_dtype)
        return {"output": request.output, "bytes": written, "document": api.document_info(document), "cache": compressed.stats()}

    def after_request(self) -> None:
        """Once a reply is out: profile documents added since ("profiled when added"), then
        settle placement (overflows resolved, files written), off the request's critical path.

        Profiling waits while other requests wait for the model: it reads the document at
        every method it measures (seconds on a GPU, tens of seconds on a CPU), all of it
        added to their time to first token. It runs at the next reply with nobody waiting,
        or when the server is idle (`profile_idle`)."""
        if self.manager.profiler is not None and not self.others_waiting():
            fresh = [e for e in list(self.manager.entries.values()) if not e.profiled and self.known_text(e.id)]
            for entry in fresh:
                self.asked_since_profile.discard(entry.id)  # its questions so far are among the probes
                try:
                    with self._work("profiling"):
                        self.manager.profile(entry)
                except KvcliError as exc:
                    self.manager.note(entry.id, f"profiling failed: {exc}")
                self._keep_profiled_reads(entry)
        self._rebalance_after_profiling()

    def _keep_profiled_reads(self, entry: Entry) -> None:
        take = getattr(self.manager.profiler, "take_reads", None)  # a profiler of ours (tests give others)
        if take is not None:
            self._profiled_reads[entry.id] = take(entry.id)

    def _rebalance_after_profiling(self) -> None:
        try:
            self.rebalance()
        finally:
            self._profiled_reads.clear()  # held only for this rebalance: memory is the tiers' to account

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
            due = [e for e in list(self.manager.entries.values()) if self.known_text(e.id)
                   and (not e.profiled or e.id in self.asked_since_profile or now - e.profiled_at > stale_seconds)]
            if not due:
                return None
            entry = min(due, key=lambda e: (e.profiled, e.profiled_at))
            self.asked_since_profile.discard(entry.id)
            with self._work("profiling"):
                self.manager.profile(entry)
            self._keep_profiled_reads(entry)
            self._rebalance_after_profiling()
            return entry.id
        finally:
            self.lock.release()
