"""What `kvcli info` reports about a loaded model and the software around it."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import kvcli
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
        "created": header.created,
        "kvcli_version": header.kvcli_version,
    }
