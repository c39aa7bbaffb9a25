"""What `kvcli info` reports about a loaded model and the software around it."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import TYPE_CHECKING

import kvcli

if TYPE_CHECKING:  # describing a .kvc file (cache_file_info) needs no torch
    from kvcli.models import LoadedModel

LIBRARIES = ("torch", "transformers", "triton", "safetensors", "gguf", "pypdf", "typer", "rich", "llama-cpp-python")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_info(model: LoadedModel) -> dict:
    config = model.config
    import torch

    device = str(model.device)
    if model.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(model.device)})"
    return {
        "model": model.name,
        "architecture": (config.architectures or [config.model_type])[0],
        "fingerprint": model.fingerprint[:16],
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "context_length": model.context_length,
        "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "load_seconds": round(model.load_seconds, 2),
        "kvcli": kvcli.__version__,
        "python": platform.python_version(),
        **library_versions(),
    }


def cache_file_info(path: str) -> dict:
    """What a .kvc file holds, from its header alone (no tensors are read)."""
    from kvcli.store.kvcfile import read_header

    header = read_header(path)
    model, document, method, _ = header.require_document(path)
    # Rows that are not the document's (the prefix) in every head, so "kept" counts document tokens.
    other = max(0, header.original_length - document.tokens)
    return {
        "file": path,
        "model": model.name,
        "model_fingerprint": model.fingerprint[:16],
        "document": document.name,
        "document_sha256": document.sha256,
        "pages": len(document.pages),
        "document_tokens": document.tokens,
        "method": method.method,
        "ratio": method.ratio,
        "budget": method.budget,
        "kv_dtype": header.kv_dtype,
        "bytes": os.path.getsize(path),
        "kept_per_layer": [sum(layer) - other * len(layer) for layer in header.lengths],
        "kept_per_page": kept_shares(header),  # None: saved by an older kvcli
        "created": header.created,
        "kvcli_version": header.kvcli_version,
    }


def kept_shares(header) -> dict | None:
    """{page: share of its tokens kept} as the file recorded it (None: an older file)."""
    recorded = (header.stats or {}).get("kept_per_page")
    if not isinstance(recorded, dict):
        return None
    return {str(page): share for page, share in zip(recorded.get("pages", []), recorded.get("kept_share", []))}


def show(value) -> str:
    """One `kvcli info` value as text: a page map reads "p. 1 31%, p. 2 25%"."""
    if isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values()):
        return ", ".join(f"p. {page} {share:.0%}" for page, share in value.items())
    return str(value)


def kept_map(path: str) -> dict:
    """What `info --map` draws, from the file's kept positions: {"document", "method",
    "pages", "per_layer" ([layer][page] share kept), "per_head" ([layer][head] document
    tokens kept)}."""
    from kvcli.citations import TokenPages, kept_document_rows, kept_per_page
    from kvcli.errors import KvcliError
    from kvcli.store.kvcfile import load_cache

    cache, header = load_cache(path, headroom=0)
    _, document, method, prefix_ids = header.require_document(path)
    if document.token_pages is None:
        raise KvcliError(f"{path} has no page map in tokens (saved by an older kvcli): compress the document again to draw it")
    pages = TokenPages(None, list(document.token_pages))
    kept = cache.kept_per_head()
    shares = kept_per_page(cache, kept, pages, len(prefix_ids))
    per_head = [
        [len(kept_document_rows(layer, int(kept[l, h]), h, len(prefix_ids), document.tokens)[1]) for h in range(layer.num_kv_heads)]
        for l, layer in enumerate(cache.layers)
    ]
    return {"document": document.name, "method": method.method, "ratio": method.ratio, "pages": shares["pages"], "per_layer": shares["per_layer"], "per_head": per_head}


def kept_map_png(kept: dict) -> bytes:
    """Pages (x) against layers (y), colour the share of each page's tokens kept; beside
    it, the document tokens each head kept (its budget)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: render to bytes
    import matplotlib.pyplot as plt

    pages, per_layer, per_head = kept["pages"], kept["per_layer"], kept["per_head"]
    layers, heads = len(per_layer), len(per_head[0])
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(min(16, 5 + 0.35 * len(pages) + 0.3 * heads), 0.18 * layers + 2.6),
        gridspec_kw={"width_ratios": [max(len(pages), 3), max(heads, 2)]},
    )
    shares = left.imshow(per_layer, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    step = max(1, len(pages) // 30)  # at most ~30 page labels
    left.set_xticks(range(0, len(pages), step), [str(p) for p in pages[::step]])
    left.set_xlabel("page")
    left.set_ylabel("layer")
    left.set_title("share of each page's tokens kept")
    figure.colorbar(shares, ax=left, fraction=0.05, pad=0.02).set_label("share kept")
    budgets = right.imshow(per_head, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
    right.set_xticks(range(heads), [str(h) for h in range(heads)])
    right.set_xlabel("KV head")
    right.set_ylabel("layer")
    right.set_title("document tokens kept per head")
    figure.colorbar(budgets, ax=right, fraction=0.08, pad=0.04).set_label("tokens kept")
    ratio = f" at ratio {kept['ratio']:g}" if kept["ratio"] else ""
    figure.suptitle(f"What was kept of {kept['document']}: {kept['method']}{ratio}", fontsize=11)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110)
    plt.close(figure)
    return out.getvalue()


def write_kept_map(path: str, output: str) -> dict:
    """Draw `kept_map_png` of the .kvc file `path` into `output` (atomic); returns what was drawn and where."""
    from kvcli.errors import KvcliError
    from kvcli.store.kvcfile import atomic_write

    if not output.endswith(".png"):
        raise KvcliError(f"--map writes a PNG image: give a FILE.png, not {output}")
    kept = kept_map(path)
    data = kept_map_png(kept)
    atomic_write(output, data)
    return {"file": output, "bytes": len(data), "pages": len(kept["pages"]), "layers": len(kept["per_layer"])}
