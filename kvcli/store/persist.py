"""Compress once, save, answer later: .kvc files and the content-addressed cache store.

A question-agnostic cache holds [prefix][document]; the file records the exact prefix
tokens, so a later question part appended after it reproduces the prompt a one-shot
`ask --agnostic` would have built. The store keeps such files under the user cache dir,
named by a hash of everything that determines their content (document, model, method,
budget, kv dtype, reading precision), so `ask DOC Q --reuse` pays for reading a document once.

The store is private (directory 0700, files 0600: a cache holds the document's content in
its keys and values, and its header names it) and its files are not trusted for their
name alone: a file at a store key is used only if its header's document hash, model
fingerprint, shapes and method are the ones the key stands for.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from kvcli import __version__
from kvcli.compress.reading import Compressed, Progress, read
from kvcli.attention import cache_shape
from kvcli.citations import TokenPages
from kvcli.store.header import KvcHeader
from kvcli.store.kvcfile import is_cache_file, load_cache, read_header, save_cache
from kvcli.documents import Document
from kvcli.errors import KvcliError
from kvcli.compress.methods import Press, make_press
from kvcli.models import LoadedModel, cache_dir
from kvcli.compress.pipeline import DEFAULT_CHUNK
from kvcli.prompts import ChatTemplate, PromptLayout

STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600


def header_for(model: LoadedModel, document: Document, compressed: Compressed, kv_dtype: str) -> dict:
    config = model.config
    return {
        "model": {
            "name": model.name,
            "fingerprint": model.fingerprint,
            "architecture": (config.architectures or [config.model_type])[0],
            "num_layers": config.num_hidden_layers,
            "num_kv_heads": config.num_key_value_heads,
            "head_dim": compressed.cache.layers[0].keys.shape[-1],
        },
        "document": {
            "name": document.name,
            "sha256": document.sha256,
            "pages": [[p.page, p.start, p.end] for p in document.pages],
            "tokens": compressed.document_tokens,
            **(compressed.pages.header_fields() if compressed.pages is not None else {}),
        },
        "prefix_ids": compressed.layout.prefix_ids,
        "method": {**compressed.press.describe(), "agnostic": True},
        "stats": {k: v for k, v in compressed.stats().items() if k not in ("method", "ratio", "budget", "agnostic")} | _kept_per_page(compressed)
        | {"read_precision": model.precision.reading},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kvcli_version": __version__,
    }


def _kept_per_page(compressed: Compressed) -> dict:
    """{"kept_per_page": {"pages", "kept_share"}} for `kvcli info` to show from the header alone."""
    shares = compressed.kept_per_page()
    return {} if shares is None else {"kept_per_page": {"pages": shares["pages"], "kept_share": shares["kept_share"]}}


def compress(
    model: LoadedModel,
    document: Document,
    press: Press,
    output: str | os.PathLike,
    *,
    kv_dtype: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    max_context: int | None = None,
    mode: int | None = None,
) -> tuple[Compressed, int]:
    """Read `document` question-agnostically in the model's reading precision, compress it
    and save it to `output` (atomic; `mode` for a new file, see kvcfile.atomic_write)."""
    with model.reading() as reader:
        compressed = read(reader, document, press, question=None, chunk_size=chunk_size, progress=progress, max_context=max_context)
    header = header_for(model, document, compressed, kv_dtype)
    written = save_cache(output, compressed.cache, header, kv_dtype=kv_dtype, mode=mode)
    compressed.source = str(output)
    return compressed, written


def load(
    model: LoadedModel, path: str | os.PathLike, *, accept: Callable[[KvcHeader], None] | None = None, scores: bool = False
) -> tuple[Compressed, KvcHeader]:
    """Load a .kvc file for `model`: refuses files made by another model or for other shapes,
    and bare caches with no document, all before allocating the cache. `accept`: a further
    check of the header (raise KvcliError), run at the same point. scores: also read the
    file's per-row selection scores into `cache.scores` when it holds them (kvcli serve
    does, to compress it further without reading the document again)."""

    def check(header: KvcHeader) -> None:
        header.require_document(str(path))
        if accept is not None:
            accept(header)

    cache, header = load_cache(
        path,
        device=model.device,
        dtype=model.dtype,
        expected_model=model.fingerprint,
        expected_model_name=model.name,
        expected_shape=cache_shape(model.model),
        accept=check,
        scores=scores,
    )
    _, document, method, prefix_ids = header.require_document(str(path))
    template = ChatTemplate.from_tokenizer(model.tokenizer)
    layout = PromptLayout(model.tokenizer, template, list(prefix_ids), [], [])
    if layout.prefix_ids != PromptLayout.build(model.tokenizer, "", None).prefix_ids:
        raise KvcliError(f"{path} was made with a different prompt template; compress the document again")
    try:
        press = make_press(method.method, ratio=method.ratio, budget=method.budget)
    except KvcliError as e:
        raise KvcliError(f"{path}: its method cannot be used here ({e})") from None
    compressed = Compressed(
        cache=cache,
        layout=layout,
        press=press,
        agnostic=True,
        document_tokens=document.tokens,
        source=str(path),
        pages=None if document.token_pages is None else TokenPages(None if document.token_ids is None else list(document.token_ids), list(document.token_pages)),
    )
    return compressed, header


# ---- the content-addressed store ------------------------------------------------------


def store_dir() -> Path:
    return cache_dir() / "store"


def ensure_store_dir() -> Path:
    """The store directory, created 0700 (and tightened to 0700 if an older kvcli made it
    wider: its files hold document contents). Returns it."""
    path = store_dir()
    try:
        path.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
        info = path.lstat()
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            path.chmod(STORE_DIR_MODE)
    except OSError as e:
        raise KvcliError(f"cannot create the cache store {path}: {e.strerror or e}") from None
    return path


def store_key(model: LoadedModel, document: Document, press: Press, kv_dtype: str) -> str:
    # The reading precision is part of what a cache is: a bfloat16-autocast read stores
    # float32 rows too, so kv_dtype alone cannot tell it from a float32 read.
    identity = json.dumps(
        [document.sha256, model.fingerprint, press.name, press.ratio, press.budget, kv_dtype, model.precision.reading], sort_keys=True
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _matches_key(path: Path, document: Document, press: Press, kv_dtype: str, reading: str) -> Callable[[KvcHeader], None]:
    """A check that the file at a store key really is what the key stands for (the model's
    fingerprint and shapes are checked by `load` itself)."""

    def check(header: KvcHeader) -> None:
        _, doc, method, _ = header.require_document(str(path))
        if doc.sha256 != document.sha256:
            raise KvcliError(f"{path.name} holds another document ({doc.name}, sha256 {doc.sha256[:12]}…)")
        if (method.method, method.ratio, method.budget) != (press.name, press.ratio, press.budget):
            raise KvcliError(f"{path.name} was compressed with {method.method} (ratio {method.ratio}, budget {method.budget})")
        if kv_dtype != "auto" and header.kv_dtype != kv_dtype:
            raise KvcliError(f"{path.name} is stored as {header.kv_dtype}, not {kv_dtype}")
        stored = (header.stats or {}).get("read_precision")
        if stored is not None and stored != reading:
            raise KvcliError(f"{path.name} was read in {stored}, not {reading}")

    return check


def reuse(
    model: LoadedModel,
    document: Document,
    press: Press,
    *,
    kv_dtype: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    max_context: int | None = None,
) -> tuple[Compressed, bool, str | None]:
    """The stored cache for this document/model/method, compressing it on first use.

    Returns (compressed, hit, warning). A file at the store key is used only if its header
    matches (document sha256, model fingerprint and shapes, method, kv dtype); one that does
    not, or no longer loads, is replaced, and `warning` says why, for the caller to show.
    """
    path = store_dir() / f"{store_key(model, document, press, kv_dtype)}.kvc"
    warning = None
    if os.path.lexists(path):
        try:
            return load(model, path, accept=_matches_key(path, document, press, kv_dtype, model.precision.reading))[0], True, None
        except KvcliError as e:  # corrupt, stale or planted: compress again below, replacing it atomically
            warning = f"ignored the stored cache: {e}; compressed the document again"
    ensure_store_dir()
    compressed, _ = compress(
        model, document, press, path, kv_dtype=kv_dtype, chunk_size=chunk_size, progress=progress,
        max_context=max_context, mode=STORE_FILE_MODE,
    )
    return compressed, False, warning


def store_entries() -> list[dict]:
    """One summary per stored cache; unreadable files are listed with their error."""
    entries = []
    for path in sorted(store_dir().glob("*.kvc")):
        entry: dict = {"id": path.stem, "path": str(path), "bytes": None}
        try:
            entry["bytes"] = path.lstat().st_size
            header = read_header(path)
            model, document, method, _ = header.require_document(str(path))
            entry.update(
                document=document.name,
                document_sha256=document.sha256[:12],
                model=model.name,
                method=method.method,
                ratio=method.ratio,
                kv_dtype=header.kv_dtype,
                created=header.created,
            )
        except OSError as exc:
            entry["error"] = f"cannot read {path}: {exc.strerror or exc}"
        except KvcliError as exc:
            entry["error"] = str(exc)
        entries.append(entry)
    return entries


def store_remove(prefix: str) -> list[str]:
    """Remove the stored caches whose id starts with `prefix` (refuses ambiguous or path-like ids)."""
    if not prefix or not all(c in "0123456789abcdef" for c in prefix):
        raise KvcliError(f"invalid cache id {prefix!r}: ids are hexadecimal (see `kvcli cache list`)")
    matches = [p for p in store_dir().glob("*.kvc") if p.stem.startswith(prefix)]
    if not matches:
        raise KvcliError(f"no stored cache with id {prefix}")
    if len(matches) > 1:
        raise KvcliError(f"cache id {prefix} is ambiguous ({len(matches)} matches); give more characters")
    matches[0].unlink()
    return [matches[0].stem]


def store_clear() -> int:
    removed = 0
    for path in store_dir().glob("*.kvc"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
