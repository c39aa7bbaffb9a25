"""Compress once, save, answer later: .kvc files and the content-addressed cache store.

A question-agnostic cache holds [prefix][document]; the file records the exact prefix
tokens, so a later question part appended after it reproduces the prompt a one-shot
`ask --agnostic` would have built. The store keeps such files under the user cache dir,
named by a hash of everything that determines their content (document, model, method,
budget, kv dtype), so `ask DOC Q --reuse` pays for reading a document once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from kvcli import __version__
from kvcli.compress.reading import Compressed, Progress, read
from kvcli.store.kvcfile import load_cache, read_header, save_cache
from kvcli.documents import Document
from kvcli.errors import KvcliError
from kvcli.compress.methods import Press, make_press
from kvcli.models import LoadedModel, cache_dir
from kvcli.compress.pipeline import DEFAULT_CHUNK
from kvcli.prompts import ChatTemplate, PromptLayout


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
        },
        "prefix_ids": compressed.layout.prefix_ids,
        "method": {**compressed.press.describe(), "agnostic": True},
        "stats": {k: v for k, v in compressed.stats().items() if k not in ("method", "ratio", "budget", "agnostic")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kvcli_version": __version__,
    }


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
) -> tuple[Compressed, int]:
    """Read `document` question-agnostically, compress it and save it to `output` (atomic)."""
    compressed = read(model, document, press, question=None, chunk_size=chunk_size, progress=progress, max_context=max_context)
    written = save_cache(output, compressed.cache, header_for(model, document, compressed, kv_dtype), kv_dtype=kv_dtype)
    compressed.source = str(output)
    return compressed, written


def load(model: LoadedModel, path: str | os.PathLike) -> tuple[Compressed, dict]:
    """Load a .kvc file for `model`; refuses files made by another model."""
    cache, header = load_cache(
        path, device=model.device, dtype=model.dtype, expected_model=model.fingerprint, expected_model_name=model.name
    )
    template = ChatTemplate.from_tokenizer(model.tokenizer)
    layout = PromptLayout(model.tokenizer, template, list(header["prefix_ids"]), [], [])
    if layout.prefix_ids != PromptLayout.build(model.tokenizer, "", None).prefix_ids:
        raise KvcliError(f"{path} was made with a different prompt template; compress the document again")
    method = header.get("method", {})
    press = make_press(method.get("method", "full"), ratio=method.get("ratio"), budget=method.get("budget"))
    compressed = Compressed(
        cache=cache,
        layout=layout,
        press=press,
        agnostic=True,
        document_tokens=int(header["document"]["tokens"]),
        source=str(path),
    )
    return compressed, header


def is_cache_file(source: str) -> bool:
    return source.endswith(".kvc")


# ---- the content-addressed store ------------------------------------------------------


def store_dir() -> Path:
    return cache_dir() / "store"


def store_key(model: LoadedModel, document: Document, press: Press, kv_dtype: str) -> str:
    identity = json.dumps(
        [document.sha256, model.fingerprint, press.name, press.ratio, press.budget, kv_dtype], sort_keys=True
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def reuse(
    model: LoadedModel,
    document: Document,
    press: Press,
    *,
    kv_dtype: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    max_context: int | None = None,
) -> tuple[Compressed, bool]:
    """The stored cache for this document/model/method, compressing it on first use.

    Returns (compressed, hit). A stored file that no longer loads is replaced.
    """
    path = store_dir() / f"{store_key(model, document, press, kv_dtype)}.kvc"
    if path.is_file():
        try:
            return load(model, path)[0], True
        except KvcliError:
            pass  # corrupt or stale: compress again below, replacing it atomically
    path.parent.mkdir(parents=True, exist_ok=True)
    compressed, _ = compress(model, document, press, path, kv_dtype=kv_dtype, chunk_size=chunk_size, progress=progress, max_context=max_context)
    return compressed, False


def store_entries() -> list[dict]:
    """One summary per stored cache; unreadable files are listed with their error."""
    entries = []
    for path in sorted(store_dir().glob("*.kvc")):
        entry = {"id": path.stem, "path": str(path), "bytes": path.stat().st_size}
        try:
            header = read_header(path)
            entry.update(
                document=header["document"]["name"],
                document_sha256=header["document"]["sha256"][:12],
                model=header["model"]["name"],
                method=header["method"].get("method"),
                ratio=header["method"].get("ratio"),
                kv_dtype=header.get("kv_dtype"),
                created=header.get("created"),
            )
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
