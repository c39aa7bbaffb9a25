"""Joint compression and placement of many documents' KV caches across GPU, CPU and disk.

The EVICPRESS idea (joint eviction and compression for a tiered KV-cache store): every
document c can be kept in one of several configurations x (method x kept ratio x kv
dtype, from light to heavy compression) on one tier t (GPU memory, CPU memory, the disk
store, or nowhere: read the text again). Each choice is scored by one utility

    U(c, x, t) = freq(c) * (quality(c, x) - alpha / (1 - rho) * ttft(c, x, t))

    quality(c, x)  in [0, 1]: agreement of answers over configuration x with answers over
                   the full cache (profiled per document: kvcli.serve.profiling.AgreementProfiler)
    ttft(c, x, t)  seconds: bytes(c, x, t) / bandwidth(t) + question_tokens * prefill_s_per_token
                   for a tier that holds it (the compute tier's bandwidth is infinite);
                   (document + question tokens) * prefill_s_per_token when it is held nowhere
    freq(c)        accesses, exponentially decayed with a half-life (`half_life`, in the
                   clock's unit: seconds in the server, requests in the benchmark)
    alpha          quality per second of delay (default 0.5: one second of waiting costs half
                   the whole quality scale; 100 ms costs 0.05), divided by (1 - rho) while the
                   model is busy a share rho of the time (`utilization`, measured by the
                   server): in a single-server queue the mean response time is the service
                   time / (1 - rho), so each second a request holds the model (a load, a
                   re-read) costs the requests queued behind it too. An idle server weighs
                   delay by alpha; one busy 80% of the time by 5 alpha, and compresses more.

When a tier overflows, `resolve` repeatedly applies the single change that loses the
least utility per byte it frees on that tier: compress one document one step further (the
next configuration that is smaller on that tier) or demote it one tier down (the lowest
tier demotes to "none"). A compression-sensitive document loses much quality per step, so
it is demoted rather than compressed: it stays lightly compressed. Every change is
appended to `decisions` with its reason.

The baselines it is measured against are here too, behind the same interface (`kvcli serve
--policy`): LRUManager (one configuration, least recently used demoted: LMCache-style over
full caches, or every cache at one fixed ratio) and CompressOnlyManager (the utility's
compression, no demotion to slower tiers).

The utility counts a "compress" step as free. In the server it nearly is when the lighter
cache is held (any tier) with the scores it was compressed with and the method's allocation
is nested (KVzip's, per-head top-k): the heavier cache is then selected from it, exactly
what reading again would keep, with no model pass (kvcli.compress.pipeline.derive). From a
full cache, or for other methods, the server still reads the document again.

This module is bookkeeping only: no model, no files, no devices. The server applies the
placement it computes (kvcli.serve.service) on tiers measured by kvcli.serve.tiers; the
benchmark simulates it (kvcli.benchmarks.evicpress). Its
methods take one re-entrant lock, so the server can list caches from one thread while a
request moves them in another.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

DEFAULT_ALPHA = 0.5  # quality per second of time to first token
DEFAULT_HALF_LIFE = 600.0  # seconds: an access ten minutes ago counts half
MAX_UTILIZATION = 0.9  # delay weighed 10x at most: past it the queue factor is a guess about an overloaded server
DEFAULT_QUESTION_TOKENS = 32  # a typical question part (chat turn + question)
NOWHERE = "none"  # not stored: the next question reads the document again
GROUP_SIZE = 32  # kvcli.store.kvcfile quantizes per group of 32 values along head_dim


@dataclass(frozen=True)
class Config:
    """One way to keep a document: method at kept `ratio`, stored as `kv_dtype`."""

    method: str
    ratio: float
    kv_dtype: str = "auto"  # auto = the compute dtype; int8 / int4 are lossy

    @property
    def name(self) -> str:
        return f"{self.method}@{self.ratio:g}/{self.kv_dtype}"


# From light to heavy. A chain, so "compress one step further" is well defined. Managed
# caches are question-agnostic (one per document, for every later question), so the method is
# the agnostic default, KVzip (kvcli.compress.methods.DEFAULT_AGNOSTIC_METHOD; EVAL.md: the
# SnapKV family keeps 1-3% of the full cache's score agnostic at 25%, KVzip 108%).
DEFAULT_CONFIGS = (
    Config("full", 1.0),
    Config("kvzip", 0.5),
    Config("kvzip", 0.25),
    Config("kvzip", 0.25, "int8"),
    Config("kvzip", 0.1, "int8"),
    Config("kvzip", 0.1, "int4"),
)


@dataclass
class Tier:
    name: str
    capacity: int  # bytes
    bandwidth: float  # bytes/s from this tier to the compute device (inf: it is the compute device)
    encoded: bool = False  # holds .kvc files (kv dtype applies) rather than compute-dtype tensors


@dataclass(frozen=True)
class CacheShape:
    """What one kept token costs: every layer and KV head holds one row of K and V."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    compute_bytes: int = 2  # element size of the compute dtype (bf16)

    def bytes_per_token(self, kv_dtype: str, encoded: bool, scored: bool = False) -> int:
        """Bytes of one kept token over all layers and heads (K + V + its int32 position;
        scored: + its fp32 selection score, which the server's .kvc files of compressed
        configurations hold, so that they can be compressed further without a read)."""
        padded = -(-self.head_dim // GROUP_SIZE) * GROUP_SIZE
        groups = padded // GROUP_SIZE
        if not encoded or kv_dtype == "auto":
            row = self.head_dim * self.compute_bytes
        elif kv_dtype in ("fp32",):
            row = self.head_dim * 4
        elif kv_dtype in ("fp16", "bf16"):
            row = self.head_dim * 2
        elif kv_dtype == "int8":
            row = padded + 2 * groups  # codes + fp16 scales
        elif kv_dtype == "int4":
            row = padded // 2 + 4 * groups  # packed codes + fp16 scales and offsets
        else:
            raise ValueError(f"unknown kv dtype {kv_dtype!r}")
        return self.num_layers * self.num_kv_heads * (2 * row + 4 + (4 if scored else 0))


@dataclass
class Entry:
    """One document the manager knows, with its placement (config index, tier name)."""

    id: str  # hexadecimal
    name: str
    doc_tokens: int
    prefix_tokens: int = 0  # chat prefix kept whole with every configuration
    quality: dict[int, float] = field(default_factory=dict)  # config index -> profiled quality
    config: int = 0
    tier: str = NOWHERE
    freq: float = 0.0
    last_access: float = 0.0
    recompressible: bool = True  # its text is known: a higher ratio can be read again
    profiled: bool = False  # quality measured (else: the prior)
    profiled_at: float = 0.0  # clock time of the last profile


@dataclass
class Decision:
    at: float
    entry: str
    name: str
    action: str  # admit, promote, compress, demote, drop, restore, fail, note, remove
    before: str  # "config on tier"
    after: str
    reason: str

    def describe(self) -> str:
        return f"{self.action} {self.name} ({self.entry[:12]}): {self.before} -> {self.after}: {self.reason}"


class Profiler(Protocol):
    """Measures quality(c, x) for the given configuration indices of one entry."""

    def __call__(self, entry: Entry, configs: list[int]) -> dict[int, float]: ...


def prior_quality(config: Config) -> float:
    """Quality assumed before profiling: falls with the evicted fraction and the kv bits."""
    if config.method == "full":
        quality = 1.0
    else:
        quality = 1.0 - 0.5 * (1.0 - config.ratio) ** 2
    return quality - {"int8": 0.01, "int4": 0.05}.get(config.kv_dtype, 0.0)


def _locked(method):
    """Run a CacheManager method under its lock (readers never see a half-applied move)."""

    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


class CacheManager:
    """Tiers, entries, the utility and the greedy overflow resolution."""

    def __init__(
        self,
        tiers: list[Tier],
        shape: CacheShape,
        *,
        configs: tuple[Config, ...] = DEFAULT_CONFIGS,
        alpha: float = DEFAULT_ALPHA,
        prefill_seconds_per_token: float = 1e-3,
        question_tokens: int = DEFAULT_QUESTION_TOKENS,
        half_life: float = DEFAULT_HALF_LIFE,
        clock: Callable[[], float] = time.monotonic,
        profiler: Profiler | None = None,
        keep_decisions: int = 10_000,
        on_decision: Callable[[Decision], None] | None = None,
    ):
        if not tiers:
            raise ValueError("at least one tier is needed")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if len({t.name for t in tiers}) != len(tiers) or NOWHERE in {t.name for t in tiers}:
            raise ValueError("tier names must be unique and not 'none'")
        self.tiers = list(tiers)  # top (fastest) first
        self.shape = shape
        self.configs = tuple(configs)
        self.alpha = alpha
        self.utilization = 0.0  # the share of recent time the model was busy (kvcli.serve.service measures it)
        # Whether config `step` of an entry can be selected from its copy held as config
        # `held` (selection scores kept, a nested allocation): the server knows, and sets it.
        self.derivable: Callable[[Entry, int, int], bool] = lambda entry, held, step: False
        self.prefill_seconds_per_token = prefill_seconds_per_token
        self.question_tokens = question_tokens
        self.half_life = half_life
        self.clock = clock
        self.profiler = profiler
        self.entries: dict[str, Entry] = {}
        self.decisions: list[Decision] = []
        self.keep_decisions = keep_decisions
        self.on_decision = on_decision  # e.g. `kvcli serve -v` logs every placement change
        self.lock = threading.RLock()

    # ---- the model of cost and value --------------------------------------------------

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def below(self, name: str) -> str:
        names = [t.name for t in self.tiers]
        index = names.index(name)
        return names[index + 1] if index + 1 < len(names) else NOWHERE

    def kept_tokens(self, entry: Entry, config: int) -> int:
        ratio = self.configs[config].ratio
        return entry.prefix_tokens + math.ceil(ratio * entry.doc_tokens)

    def size(self, entry: Entry, config: int, tier: str) -> int:
        """Bytes entry takes on `tier` in configuration `config` (0 on "none")."""
        t = self.tier(tier)
        if t is None:
            return 0
        method = self.configs[config].method
        per_token = self.shape.bytes_per_token(self.configs[config].kv_dtype, t.encoded, scored=t.encoded and method != "full")
        return self.kept_tokens(entry, config) * per_token

    def ttft(self, entry: Entry, config: int, tier: str) -> float:
        """Expected seconds to the first answer token when the entry is held so."""
        question = self.question_tokens * self.prefill_seconds_per_token
        t = self.tier(tier)
        if t is None:  # read the whole document again
            return (entry.prefix_tokens + entry.doc_tokens) * self.prefill_seconds_per_token + question
        load = 0.0 if math.isinf(t.bandwidth) else self.size(entry, config, tier) / t.bandwidth
        return load + question

    def quality(self, entry: Entry, config: int) -> float:
        if config in entry.quality:
            return entry.quality[config]
        return prior_quality(self.configs[config])

    def frequency(self, entry: Entry, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return entry.freq * 0.5 ** (max(0.0, now - entry.last_access) / self.half_life)

    def delay_weight(self) -> float:
        """Quality per second of time to first token: alpha / (1 - utilization)."""
        return self.alpha / (1.0 - min(max(self.utilization, 0.0), MAX_UTILIZATION))

    def utility(self, entry: Entry, config: int, tier: str, now: float | None = None) -> float:
        """U = freq * (quality - alpha / (1 - rho) * ttft); what the document is worth held this way."""
        if tier == NOWHERE:
            config = 0  # the next question reads it again, at the lightest configuration
        return self.frequency(entry, now) * (self.quality(entry, config) - self.delay_weight() * self.ttft(entry, config, tier))

    @_locked
    def used(self, tier: str) -> int:
        return sum(self.size(e, e.config, tier) for e in self.entries.values() if e.tier == tier)

    # ---- events -----------------------------------------------------------------------

    def add(self, entry: Entry, *, profile: bool = True) -> Entry:
        """Register a document (not yet placed) and profile its configurations."""
        with self.lock:
            self.entries[entry.id] = entry
        if profile and self.profiler is not None and not entry.profiled:
            self.profile(entry)
        return entry

    def profile(self, entry: Entry) -> None:
        measured = self.profiler(entry, list(range(len(self.configs))))  # slow: outside the lock
        with self.lock:
            entry.quality.update(measured)
            entry.profiled = True
            entry.profiled_at = self.clock()

    @_locked
    def access(self, entry_id: str) -> tuple[Entry, str, int]:
        """Count one question for the entry; returns (entry, tier it is served from, config).

        The entry is then held on the top tier in its configuration (it was loaded there to
        answer); an entry held nowhere is read again at the lightest configuration. Call
        `resolve` afterwards.
        """
        entry = self.entries[entry_id]
        now = self.clock()
        served_from, served_config = entry.tier, entry.config
        entry.freq = self.frequency(entry, now) + 1.0
        entry.last_access = now
        top = self.tiers[0].name
        if entry.tier == NOWHERE:
            self._move(entry, 0, top, "admit", "asked for; read into the top tier")
        elif entry.tier != top:
            self._move(entry, entry.config, top, "promote", f"asked for; loaded from {served_from}")
        return entry, served_from, served_config

    @_locked
    def place(self, entry_id: str, config: int, tier: str, reason: str) -> None:
        """Record a placement found outside the policy (e.g. a file found on disk at startup)."""
        self._move(self.entries[entry_id], config, tier, "restore", reason)

    @_locked
    def remove(self, entry_id: str) -> Entry:
        entry = self.entries.pop(entry_id)
        self._log(entry, "remove", self._where(entry), NOWHERE, "removed on request")
        return entry

    # ---- the joint policy -------------------------------------------------------------

    def candidates(self, tier: str, now: float) -> list[tuple[float, float, Entry, int, str, str]]:
        """Every single change that frees bytes on `tier`: (loss per byte, -age, entry, config, tier, action)."""
        moves = []
        for entry in self.entries.values():
            if entry.tier != tier:
                continue
            here = self.size(entry, entry.config, tier)
            current = self.utility(entry, entry.config, tier, now)
            step = self._next_smaller(entry, tier)
            if step is not None:
                freed = here - self.size(entry, step, tier)
                loss = current - self.utility(entry, step, tier, now)
                moves.append((loss / freed, entry.last_access, entry, step, tier, "compress"))
            lower = self.below(tier)
            if here > 0:
                loss = current - self.utility(entry, entry.config, lower, now)
                moves.append((loss / here, entry.last_access, entry, entry.config, lower, "demote" if lower != NOWHERE else "drop"))
        return moves

    def _next_smaller(self, entry: Entry, tier: str) -> int | None:
        here = self.size(entry, entry.config, tier)
        for step in range(entry.config + 1, len(self.configs)):
            same_read = (self.configs[step].method, self.configs[step].ratio) == (
                self.configs[entry.config].method,
                self.configs[entry.config].ratio,
            )
            if not (entry.recompressible or same_read or self.derivable(entry, entry.config, step)):
                continue  # without the text, only the kv dtype can change, or a selection from the copy held
            if self.size(entry, step, tier) < here:
                return step
        return None

    @_locked
    def resolve(self) -> list[Decision]:
        """Apply least-loss changes until every tier fits; returns the decisions taken."""
        start = len(self.decisions)
        now = self.clock()
        for tier in self.tiers:
            while self.used(tier.name) > tier.capacity:
                moves = self.candidates(tier.name, now)
                if not moves:
                    break  # nothing on it (capacity below zero): nothing to do
                per_byte, _, entry, config, target, action = min(moves, key=lambda m: (m[0], m[1]))
                reason = (
                    f"{tier.name} over capacity ({self.used(tier.name):,} > {tier.capacity:,} bytes); "
                    f"least utility lost per byte freed ({per_byte * 1e6:.3g} per MB, "
                    f"U {self.utility(entry, entry.config, entry.tier, now):.4g} -> {self.utility(entry, config, target, now):.4g})"
                )
                self._move(entry, config, target, action, reason)
        return self.decisions[start:]

    @_locked
    def fail(self, entry_id: str, config: int, tier: str, reason: str) -> None:
        """A placement could not be applied (e.g. the disk is full): record where the entry
        really is, the copy that is still held (`NOWHERE`, config 0, when none is)."""
        self._move(self.entries[entry_id], config if tier != NOWHERE else 0, tier, "fail", reason)

    @_locked
    def note(self, entry_id: str, reason: str) -> None:
        """Log something about an entry that does not move it (e.g. its text could not be saved)."""
        entry = self.entries[entry_id]
        self._log(entry, "note", self._where(entry), self._where(entry), reason)

    @_locked
    def store_memory(self, reason: str) -> list[Decision]:
        """Move every entry held in memory to the first encoded tier, then resolve.

        The server calls it when it stops, so a restart finds the documents on disk; where
        the disk tier is too small, the usual least-utility changes decide what is kept.
        """
        start = len(self.decisions)
        disk = next((t.name for t in self.tiers if t.encoded), None)
        if disk is not None:
            for entry in list(self.entries.values()):
                if entry.tier != NOWHERE and not self.tier(entry.tier).encoded:
                    self._move(entry, entry.config, disk, "demote", reason)
            self.resolve()
        return self.decisions[start:]

    def _where(self, entry: Entry) -> str:
        return f"{self.configs[entry.config].name} on {entry.tier}" if entry.tier != NOWHERE else NOWHERE

    def _move(self, entry: Entry, config: int, tier: str, action: str, reason: str) -> None:
        before = self._where(entry)
        entry.config, entry.tier = config, tier
        self._log(entry, action, before, self._where(entry), reason)

    def _log(self, entry: Entry, action: str, before: str, after: str, reason: str) -> None:
        decision = Decision(self.clock(), entry.id, entry.name, action, before, after, reason)
        self.decisions.append(decision)
        if self.on_decision is not None:
            self.on_decision(decision)
        if len(self.decisions) > self.keep_decisions:
            del self.decisions[: len(self.decisions) - self.keep_decisions]

    # ---- reporting ----------------------------------------------------------------------

    @_locked
    def listing(self) -> list[dict]:
        """One row per entry: tier, configuration, size, quality, ttft, utility, last reason."""
        now = self.clock()
        last = {d.entry: d for d in self.decisions}
        rows = []
        for e in sorted(self.entries.values(), key=lambda e: -self.frequency(e, now)):
            rows.append(
                {
                    "id": e.id,
                    "document": e.name,
                    "tier": e.tier,
                    "config": self.configs[e.config].name,
                    "bytes": self.size(e, e.config, e.tier),
                    "document_tokens": e.doc_tokens,
                    "prefix_tokens": e.prefix_tokens,
                    "quality": round(self.quality(e, e.config), 4),
                    "qualities": {self.configs[i].name: round(q, 4) for i, q in sorted(e.quality.items())},
                    "profiled": e.profiled,
                    "ttft_seconds": round(self.ttft(e, e.config, e.tier), 4),
                    "frequency": round(self.frequency(e, now), 4),
                    "utility": round(self.utility(e, e.config, e.tier, now), 4),
                    "reason": last[e.id].describe() if e.id in last else None,
                }
            )
        return rows

    @_locked
    def usage(self) -> list[dict]:
        return [{"tier": t.name, "capacity": t.capacity, "used": self.used(t.name), "bandwidth": t.bandwidth} for t in self.tiers]


# ---- the baselines the joint policy is measured against (`kvcli serve --policy`) ----------


class LRUManager(CacheManager):
    """Every cache in one configuration (its `configs`, one), the least recently used demoted
    a tier down when a tier overflows: what LMCache-like stores do (full caches), or the same
    over caches all compressed at one fixed ratio."""

    @_locked
    def resolve(self) -> list[Decision]:
        start = len(self.decisions)
        for tier in self.tiers:
            while self.used(tier.name) > tier.capacity:
                held = [e for e in self.entries.values() if e.tier == tier.name]
                if not held:
                    break
                victim = min(held, key=lambda e: e.last_access)
                self._move(victim, victim.config, self.below(tier.name), "demote" if self.below(tier.name) != NOWHERE else "drop",
                           f"{tier.name} over capacity; least recently used")
        return self.decisions[start:]


class CompressOnlyManager(CacheManager):
    """Compression without placement: the joint utility chooses each cache's configuration,
    but an overflowing tier only compresses or drops (nothing is demoted to a slower tier),
    as a server that compresses caches in memory and has no tiers below it would."""

    def below(self, name: str) -> str:
        return NOWHERE


POLICIES = ("joint", "lru", "compress-only")


def make_manager(policy: str, tiers: list[Tier], shape: CacheShape, *, ratio: float = 1.0, method: str = "kvzip", **options) -> CacheManager:
    """The manager of `policy`: joint (the utility over every configuration and tier), lru
    (one configuration: full caches at `ratio` 1, else `method` at `ratio`; LRU across tiers)
    or compress-only (the utility, memory tier only)."""
    if policy == "joint":
        return CacheManager(tiers, shape, **options)
    if policy == "compress-only":
        return CompressOnlyManager(tiers, shape, **options)
    if policy == "lru":
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"the kept ratio must be in (0, 1], got {ratio}")
        config = Config("full", 1.0) if ratio == 1.0 else Config(method, ratio)
        return LRUManager(tiers, shape, configs=(config,), **options)
    raise ValueError(f"unknown policy {policy!r}; choose from: {', '.join(POLICIES)}")
