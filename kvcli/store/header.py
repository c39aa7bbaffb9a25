"""The .kvc header, typed: the one place its JSON is read, checked and written.

A .kvc file's safetensors metadata holds {"kvcli": json}. That JSON has two parts:

- what `kvcfile` needs to read the tensors back (format, format_version, kv_dtype,
  source_dtype, head_dim, num_layers, lengths, original_length, next_position,
  quantization, checksum), always present, and `scores` when the file holds per-row
  selection scores (optional: written by `kvcli serve`, absent from older files);
- what the cache is of (model, document, prefix_ids, method, stats, created, manager),
  written by `persist` for document caches; bare caches (benchmarks) have none of it.

Every field is checked for type and range here, so a hostile or damaged file is one
`KvcliError` naming the field, never a KeyError or OverflowError three modules later, and
every count is small enough that nothing derived from it can ask for absurd memory (the
bounds against the file's size and the model's shapes are kvcfile's, which knows both).
Unknown keys are kept (`extra`) so `header_checksum`, a sha256 over the canonical JSON of
the whole header, still covers and reproduces them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from kvcli.errors import KvcliError

FORMAT = "kvcli-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FLOAT_DTYPES = ("fp32", "fp16", "bf16")
QUANT_BITS = {"int8": 8, "int4": 4}
# Our headers nest 3 deep (lengths, manager.quality); 32 leaves room and keeps every
# later walk of the header (the checksum's json.dumps, callers' code) shallow.
MAX_JSON_DEPTH = 32
# Shape bounds that hold for every model we run (the largest have ~128 layers, 128 KV
# heads, head_dim 256; MLA latents 576). The exact shapes are checked against the model.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_POSITION = 2**31 - 1  # positions are stored as int32
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """A header field that fails its check; `parse` turns it into a KvcliError with the path."""


# ---- JSON with bounds --------------------------------------------------------------------

def _check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse parsed JSON nested deeper than `limit` (iteratively: no recursion of ours).

    json.loads itself stops a deeper document at Python's recursion limit with a
    RecursionError (its C scanner counts its own recursion), which `loads` reports the same
    way; this caps what is left far lower, so nothing downstream recurses deeply either.
    A regex pre-scan of the text was tried and dropped: string skipping is quadratic on a
    hostile run of escaped quotes.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _small_int(text: str) -> int:
    # Nothing we store needs more than int64; 10**4000 would parse (Python allows 4300
    # digits) and then overflow torch or cost quadratic time in str().
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"integer {text[:24]}... is out of range")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str) -> Any:
    """json.loads with a depth cap, finite floats, int64-sized ints; ValueError otherwise."""
    try:
        value = json.loads(text, parse_float=_finite, parse_int=_small_int, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_depth(value)
    return value


def canonical_checksum(body: dict) -> str:
    """sha256 of the canonical JSON of `body` without its `header_checksum`."""
    body = {k: v for k, v in body.items() if k != "header_checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- field checks ------------------------------------------------------------------------


def _int(value: Any, where: str, lo: int = 0, hi: int = MAX_POSITION) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _Bad(f"header field {where} must be an integer in [{lo}, {hi}], not {_show(value)}")
    return value


def _str(value: Any, where: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _Bad(f"header field {where} must be a string, not {_show(value)}")
    return value


def _number(value: Any, where: str) -> float | int:
    if type(value) not in (int, float):
        raise _Bad(f"header field {where} must be a number, not {_show(value)}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"header field {where} must be an object, not {_show(value)}")
    return value


def _get(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise _Bad(f"header field {where}.{key} is missing" if where else f"header field {key} is missing")
    return section[key]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {json.dumps(value)[:40]}"


def _rest(section: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in section.items() if k not in known}


# ---- the sections ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """The model that made the cache; `fingerprint` is what loading checks."""

    name: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    architecture: str | None = None
    extra: dict = field(default_factory=dict)

    KEYS = ("name", "fingerprint", "architecture", "num_layers", "num_kv_heads", "head_dim")

    @classmethod
    def parse(cls, raw: Any) -> "ModelInfo":
        d = _object(raw, "model")
        architecture = d.get("architecture")
        return cls(
            name=_str(_get(d, "name", "model"), "model.name"),
            fingerprint=_str(_get(d, "fingerprint", "model"), "model.fingerprint"),
            num_layers=_int(_get(d, "num_layers", "model"), "model.num_layers", 1, MAX_LAYERS),
            num_kv_heads=_int(_get(d, "num_kv_heads", "model"), "model.num_kv_heads", 1, MAX_KV_HEADS),
            head_dim=_int(_get(d, "head_dim", "model"), "model.head_dim", 1, MAX_HEAD_DIM),
            architecture=None if architecture is None else _str(architecture, "model.architecture"),
            extra=_rest(d, cls.KEYS),
        )

    def as_dict(self) -> dict:
        d = {"name": self.name, "fingerprint": self.fingerprint}
        if self.architecture is not None:
            d["architecture"] = self.architecture
        d.update(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        return {**d, **self.extra}


@dataclass(frozen=True)
class DocumentInfo:
    """The document the cache holds: `sha256` of its raw bytes, its page spans (characters),
    its tokens; since kvcli 0.1 also `token_pages`, the page spans in document tokens
    ([page, first, end] runs covering 0..tokens), and `token_ids` (snippets of citations;
    absent for very long documents). Files without them still load; they cannot cite."""

    name: str
    sha256: str
    pages: tuple[tuple[int, int, int], ...]
    tokens: int
    extra: dict = field(default_factory=dict)
    token_pages: tuple[tuple[int, int, int], ...] | None = None
    token_ids: tuple[int, ...] | None = None

    KEYS = ("name", "sha256", "pages", "tokens", "token_pages", "token_ids")

    @classmethod
    def parse(cls, raw: Any) -> "DocumentInfo":
        d = _object(raw, "document")
        pages = _get(d, "pages", "document")
        if not isinstance(pages, list) or not all(isinstance(p, list) and len(p) == 3 for p in pages):
            raise _Bad("header field document.pages must be a list of [page, start, end]")
        tokens = _int(_get(d, "tokens", "document"), "document.tokens")
        return cls(
            name=_str(_get(d, "name", "document"), "document.name"),
            sha256=_str(_get(d, "sha256", "document"), "document.sha256", 128),
            pages=tuple(tuple(_int(v, "document.pages") for v in p) for p in pages),
            tokens=tokens,
            extra=_rest(d, cls.KEYS),
            token_pages=_token_pages(d.get("token_pages"), tokens),
            token_ids=_token_ids(d.get("token_ids"), tokens),
        )

    def as_dict(self) -> dict:
        d = {"name": self.name, "sha256": self.sha256, "pages": [list(p) for p in self.pages], "tokens": self.tokens, **self.extra}
        if self.token_pages is not None:
            d["token_pages"] = [list(p) for p in self.token_pages]
        if self.token_ids is not None:
            d["token_ids"] = list(self.token_ids)
        return d


def _token_pages(raw: Any, tokens: int) -> tuple[tuple[int, int, int], ...] | None:
    """[page, first, end] runs that tile the document's tokens in order (None: not recorded)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 3 for p in raw):
        raise _Bad("header field document.token_pages must be a list of [page, first, end]")
    spans = tuple(tuple(_int(v, "document.token_pages") for v in p) for p in raw)
    at = 0
    for _, first, end in spans:
        if first != at or end <= first:
            raise _Bad("header field document.token_pages must cover the document's tokens in order")
        at = end
    if at != tokens:
        raise _Bad(f"header field document.token_pages covers {at} tokens, not the document's {tokens}")
    return spans


def _token_ids(raw: Any, tokens: int) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != tokens:
        raise _Bad(f"header field document.token_ids must be a list of the document's {tokens} token ids")
    return tuple(_int(t, "document.token_ids") for t in raw)


@dataclass(frozen=True)
class MethodInfo:
    """How the cache was compressed: a registered method name, its ratio or budget."""

    method: str
    ratio: float | None = None
    budget: int | None = None
    agnostic: bool = True
    extra: dict = field(default_factory=dict)

    KEYS = ("method", "ratio", "budget", "agnostic")

    @classmethod
    def parse(cls, raw: Any) -> "MethodInfo":
        d = _object(raw, "method")
        ratio, budget, agnostic = d.get("ratio"), d.get("budget"), d.get("agnostic", True)
        if ratio is not None and not 0 < _number(ratio, "method.ratio") <= 1:
            raise _Bad(f"header field method.ratio must be in (0, 1], not {ratio}")
        if type(agnostic) is not bool:
            raise _Bad(f"header field method.agnostic must be true or false, not {_show(agnostic)}")
        return cls(
            method=_str(_get(d, "method", "method"), "method.method", 64),
            ratio=ratio,
            budget=None if budget is None else _int(budget, "method.budget"),
            agnostic=agnostic,
            extra=_rest(d, cls.KEYS),
        )

    def as_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "budget": self.budget, "agnostic": self.agnostic, **self.extra}


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int
    scheme: str

    @classmethod
    def parse(cls, raw: Any, kv_dtype: str) -> "Quantization | None":
        bits = QUANT_BITS.get(kv_dtype)
        if bits is None:
            if raw is not None:
                raise _Bad(f"header field quantization must be null for kv_dtype {kv_dtype}")
            return None
        d = _object(raw, "quantization")
        if _get(d, "bits", "quantization") != bits:
            raise _Bad(f"header field quantization.bits must be {bits} for kv_dtype {kv_dtype}")
        group = _int(_get(d, "group_size", "quantization"), "quantization.group_size", 1, MAX_HEAD_DIM)
        if bits == 4 and group % 2:
            raise _Bad("header field quantization.group_size must be even for int4")
        return cls(bits, group, _str(d.get("scheme", ""), "quantization.scheme", 64))

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "scheme": self.scheme}


@dataclass(frozen=True)
class ScoresInfo:
    """The optional per-row selection scores (`layer.{i}.scores`, F32 [rows of layer i], +inf
    for rows always kept): what lets `kvcli serve` derive a heavier cache from this one
    without reading the document again (kvcli.compress.pipeline.derive). The file's
    `checksum` covers them like every tensor. Files without it load as before."""

    dtype: str

    @classmethod
    def parse(cls, raw: Any) -> "ScoresInfo":
        d = _object(raw, "scores")
        dtype = _get(d, "dtype", "scores")
        if dtype != "fp32":
            raise _Bad(f"header field scores.dtype must be fp32, not {_show(dtype)}")
        return cls(dtype)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype}


# ---- the header --------------------------------------------------------------------------

_TENSOR_KEYS = (
    "format", "format_version", "kvcli_version", "kv_dtype", "source_dtype", "head_dim", "original_length",
    "next_position", "num_layers", "quantization", "lengths", "checksum", "scores",
)
_CONTENT_KEYS = ("model", "document", "prefix_ids", "method", "stats", "created", "manager")


@dataclass(frozen=True)
class KvcHeader:
    """A .kvc header, every field checked. Build one with `parse` (a file's JSON) or
    `for_cache` (on save); `to_json` writes it with its `header_checksum`."""

    # what kvcfile needs to read the tensors
    format_version: int
    kvcli_version: str
    kv_dtype: str  # as stored: fp32 | fp16 | bf16 | int8 | int4
    source_dtype: str  # the cache's dtype when it was saved (what int8/int4 decode to)
    head_dim: int
    num_layers: int
    lengths: tuple[tuple[int, ...], ...]  # [layer][kv head] rows kept
    original_length: int
    next_position: int
    quantization: Quantization | None
    checksum: str  # over the tensor bytes, scheme by format_version (see kvcfile)
    scores: ScoresInfo | None = None  # the optional layer.{i}.scores tensors (absent: none stored)
    # what the cache is of: absent from bare caches
    model: ModelInfo | None = None
    document: DocumentInfo | None = None
    prefix_ids: tuple[int, ...] | None = None
    method: MethodInfo | None = None
    stats: dict | None = None
    created: str | None = None
    manager: dict | None = None  # kvcli serve's bookkeeping; its shape is the service's
    extra: dict = field(default_factory=dict)  # any other key a writer added

    # ---- reading

    @classmethod
    def parse(cls, text: str, source: str) -> "KvcHeader":
        """The header of file `source` from its kvcli JSON; every problem a one-line KvcliError."""
        try:
            raw = loads(text)
        except (ValueError, TypeError) as e:
            raise KvcliError(f"{source} is corrupted: unreadable kvcli header ({_brief(e)})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise KvcliError(f"{source} is not a kvcli cache file")
        version = raw.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise KvcliError(f"{source} was written by format version {_show_version(version)}; this kvcli reads versions {readable}")
        if raw.get("header_checksum") != canonical_checksum(raw):
            raise KvcliError(f"{source} is corrupted (header checksum mismatch)")
        try:
            return cls.from_dict(raw)
        except _Bad as e:
            raise KvcliError(f"{source} is corrupted: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "KvcHeader":
        """Check and type a header dict (raises _Bad); `header_checksum` is not checked here."""
        kv_dtype = _get(raw, "kv_dtype", "")
        if not isinstance(kv_dtype, str) or (kv_dtype not in FLOAT_DTYPES and kv_dtype not in QUANT_BITS):
            raise _Bad(f"unknown kv_dtype {_show(kv_dtype)}")
        source_dtype = _get(raw, "source_dtype", "")
        if not isinstance(source_dtype, str) or source_dtype not in FLOAT_DTYPES:
            raise _Bad(f"unknown source_dtype {_show(source_dtype)}")
        num_layers = _int(_get(raw, "num_layers", ""), "num_layers", 1, MAX_LAYERS)
        lengths = _get(raw, "lengths", "")
        if not isinstance(lengths, list) or len(lengths) != num_layers:
            raise _Bad(f"header field lengths must be a list of {num_layers} layers")
        for i, layer in enumerate(lengths):
            if not isinstance(layer, list) or not 1 <= len(layer) <= MAX_KV_HEADS:
                raise _Bad(f"header field lengths[{i}] must be a list of 1 to {MAX_KV_HEADS} head lengths")
            for n in layer:
                _int(n, f"lengths[{i}]")
        checksum = _str(_get(raw, "checksum", ""), "checksum", 64)
        if not _HEX64.fullmatch(checksum):
            raise _Bad("header field checksum must be 64 hex digits")
        prefix_ids = raw.get("prefix_ids")
        if prefix_ids is not None:
            if not isinstance(prefix_ids, list):
                raise _Bad("header field prefix_ids must be a list of token ids")
            prefix_ids = tuple(_int(t, "prefix_ids") for t in prefix_ids)
        stats, manager, created = raw.get("stats"), raw.get("manager"), raw.get("created")
        return cls(
            format_version=_int(raw["format_version"], "format_version", 1, FORMAT_VERSION),
            kvcli_version=_str(_get(raw, "kvcli_version", ""), "kvcli_version", 64),
            kv_dtype=kv_dtype,
            source_dtype=source_dtype,
            head_dim=_int(_get(raw, "head_dim", ""), "head_dim", 1, MAX_HEAD_DIM),
            num_layers=num_layers,
            lengths=tuple(tuple(layer) for layer in lengths),
            original_length=_int(_get(raw, "original_length", ""), "original_length"),
            next_position=_int(_get(raw, "next_position", ""), "next_position"),
            quantization=Quantization.parse(raw.get("quantization"), kv_dtype),
            checksum=checksum,
            scores=None if raw.get("scores") is None else ScoresInfo.parse(raw["scores"]),
            model=None if raw.get("model") is None else ModelInfo.parse(raw["model"]),
            document=None if raw.get("document") is None else DocumentInfo.parse(raw["document"]),
            prefix_ids=prefix_ids,
            method=None if raw.get("method") is None else MethodInfo.parse(raw["method"]),
            stats=None if stats is None else _object(stats, "stats"),
            created=None if created is None else _str(created, "created", 64),
            manager=None if manager is None else _object(manager, "manager"),
            extra={k: v for k, v in raw.items() if k not in (*_TENSOR_KEYS, *_CONTENT_KEYS, "header_checksum")},
        )

    # ---- writing

    @classmethod
    def for_cache(cls, content: dict, **tensor_fields: Any) -> "KvcHeader":
        """The header of a cache being saved: the caller's `content` (model, document, ...;
        any JSON object) plus kvcfile's `tensor_fields`, which win on a clash. The result
        is checked as a file's would be, so nothing is written that could not be read back.
        """
        try:
            raw = json.loads(json.dumps(content, allow_nan=False))  # a copy, normalised as it will read back
        except (TypeError, ValueError) as e:
            raise KvcliError(f"the cache header is not plain JSON: {_brief(e)}") from None
        if not isinstance(raw, dict):
            raise KvcliError("the cache header must be a JSON object")
        raw.update(tensor_fields, format=FORMAT, format_version=FORMAT_VERSION)
        raw.pop("header_checksum", None)
        try:
            loads(json.dumps(raw))  # the depth and number bounds a reader will apply
            return cls.from_dict(raw)
        except (ValueError, _Bad) as e:
            raise KvcliError(f"cannot write this cache header: {e}") from None

    def as_dict(self) -> dict:
        """The header as plain JSON data (what the file holds, less `header_checksum`)."""
        d: dict[str, Any] = {}
        for key, value in (
            ("model", self.model and self.model.as_dict()),
            ("document", self.document and self.document.as_dict()),
            ("prefix_ids", None if self.prefix_ids is None else list(self.prefix_ids)),
            ("method", self.method and self.method.as_dict()),
            ("stats", self.stats),
            ("created", self.created),
            ("manager", self.manager),
        ):
            if value is not None:
                d[key] = value
        d.update(self.extra)
        d.update(
            format=FORMAT,
            format_version=self.format_version,
            kvcli_version=self.kvcli_version,
            kv_dtype=self.kv_dtype,
            source_dtype=self.source_dtype,
            head_dim=self.head_dim,
            original_length=self.original_length,
            next_position=self.next_position,
            num_layers=self.num_layers,
            quantization=self.quantization and self.quantization.as_dict(),
            lengths=[list(layer) for layer in self.lengths],
            checksum=self.checksum,
        )
        if self.scores is not None:
            d["scores"] = self.scores.as_dict()
        return d

    def to_json(self) -> str:
        body = self.as_dict()
        body["header_checksum"] = canonical_checksum(body)
        return json.dumps(body, ensure_ascii=True)

    # ---- derived

    @property
    def bits(self) -> int | None:
        return self.quantization.bits if self.quantization else None

    @property
    def num_kv_heads(self) -> int:
        return len(self.lengths[0])

    def require_document(self, source: str) -> tuple[ModelInfo, DocumentInfo, MethodInfo, tuple[int, ...]]:
        """(model, document, method, prefix_ids) of a document cache; a bare cache is refused."""
        missing = [name for name in ("model", "document", "method", "prefix_ids") if getattr(self, name) is None]
        if missing:
            raise KvcliError(f"{source} is not a document cache (its header has no {missing[0]}); compress a document with `kvcli compress`")
        return self.model, self.document, self.method, self.prefix_ids


def _show_version(version: Any) -> str:
    return str(version) if type(version) is int else _show(version)


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__
