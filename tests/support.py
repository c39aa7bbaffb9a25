"""Helpers shared by the test modules: tiny random models, caches, services and commands.

Fixtures live in conftest.py; plain functions and constants live here.
"""

import copy
import http.client
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvcli.cache import DEFAULT_HEADROOM, CompressedCache, LayerCache
from kvcli.documents import load_document
from kvcli.errors import KvcliError
from kvcli.models import LoadedModel
from kvcli.serve.client import Client
from kvcli.serve.manager import CacheManager, Tier
from kvcli.store import kvcfile as cachefile
from kvcli.store.header import canonical_checksum

FINGERPRINT = "abc123def4567890" * 4


def layer_from_kept(keys, values, positions, kept, headroom=DEFAULT_HEADROOM):
    """A LayerCache of the kept rows of a full cache: keys/values [Hkv, T, D], positions [T],
    kept: per head, the sorted token indices to keep."""
    return LayerCache.from_heads([keys[h, i] for h, i in enumerate(kept)], [values[h, i] for h, i in enumerate(kept)],
                                 [positions[i] for i in kept], headroom)


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def rewrite(path: Path, change) -> None:
    """Rewrite a .kvc file with its header changed (checksums are not recomputed)."""
    data = path.read_bytes()
    hlen = header_length(path)
    table = json.loads(data[8 : 8 + hlen])
    header = json.loads(table["__metadata__"]["kvcli"])
    change(header)
    path.write_bytes(st_save(st_load(data), metadata={"kvcli": json.dumps(header)}))


def tensor_chunks(path: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes, by name, straight from the file."""
    data = path.read_bytes()
    hlen = header_length(path)
    table = json.loads(data[8 : 8 + hlen])
    table.pop("__metadata__")
    return {name: data[8 + hlen + spec["data_offsets"][0] : 8 + hlen + spec["data_offsets"][1]] for name, spec in table.items()}


def frame(text: bytes, body: bytes) -> bytes:
    """safetensors framing: u64 header length, the header padded to 8 bytes, the data."""
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


class CharTokenizer:
    """A tokenizer for random models: one token per character, no chat template."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i % 26) for i in ids)

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


def tiny_llama(num_heads=8, num_kv_heads=2, layers=3, seed=0):
    """(reference transformers model, the same weights routed through kvcli)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcli.attention import install

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=16 * num_heads,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
    )
    reference = LlamaForCausalLM(copy.deepcopy(config)).eval()
    ours = LlamaForCausalLM(copy.deepcopy(config)).eval()
    ours.load_state_dict(reference.state_dict())
    install(ours)
    return reference, ours


def tiny_loaded() -> LoadedModel:
    """The eval tests' tiny model as a LoadedModel; module-level, so a spawned sweep worker
    process can load the same one (kvcli.eval.sweep.Workers)."""
    _, model = tiny_llama(8, 2, layers=3)
    return LoadedModel(model, CharTokenizer(), "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)


def small_context_llama(context=256, layers=2, rope_scaling=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcli.attention import install

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, rope_scaling=rope_scaling,
    )
    model = LlamaForCausalLM(config).eval()
    install(model)
    return model


def text_of(chars: int) -> str:
    """Distinct sentences (numbered), about `chars` characters = tokens for CharTokenizer."""
    out, i = [], 0
    while sum(map(len, out)) < chars:
        out.append(f"The fox number {i} jumps over dog {i * 7 % 13}. ")
        i += 1
    return "".join(out)[:chars]


def make_cache(
    seed: int = 0,
    *,
    num_layers: int = 3,
    num_heads: int = 4,
    tokens: int = 40,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    headroom: int = 8,
) -> CompressedCache:
    """Random cache, a different number of kept rows per head; head 1 of layer 0 keeps none."""
    gen = torch.Generator().manual_seed(seed)
    prefix = 7
    layers = []
    for layer in range(num_layers):
        keys = (torch.randn(num_heads, tokens, head_dim, generator=gen) * 3 + 0.5).to(dtype)
        values = torch.randn(num_heads, tokens, head_dim, generator=gen).to(dtype)
        positions = torch.arange(tokens) + prefix
        kept = []
        for h in range(num_heads):
            n = 0 if (layer == 0 and h == 1) else int(torch.randint(1, tokens + 1, (1,), generator=gen))
            kept.append(torch.randperm(tokens, generator=gen)[:n].sort().values)
        layers.append(layer_from_kept(keys, values, positions, kept, headroom=headroom))
    return CompressedCache(layers, torch.tensor([prefix + tokens + 3]), original_length=prefix + tokens)


def make_header(name: str = "doc.pdf") -> dict:
    return {
        "model": {
            "name": "SmolLM2-135M",
            "fingerprint": FINGERPRINT,
            "architecture": "llama",
            "num_layers": 3,
            "num_kv_heads": 4,
            "head_dim": 64,
        },
        "document": {"name": name, "sha256": "0" * 64, "pages": [[1, 0, 100], [2, 100, 250]], "tokens": 40},
        "prefix_ids": [1, 2, 3, 4, 5, 6, 7],
        "method": {"method": "snapkv", "ratio": 0.5, "budget": 20, "agnostic": True},
        "created": "2025-01-01T00:00:00Z",
        "unicode": "naïve – ünïcödé ✓",
    }


def as_version_1(path: Path, *, v1_digest: bool = True) -> None:
    """Rewrite a file as format version 1 would have written it (old single-stream checksum)."""
    chunks = tensor_chunks(path)

    def change(h):
        h["format_version"] = 1
        if v1_digest:
            h["checksum"] = cachefile._checksum_v1(chunks)
        h["header_checksum"] = canonical_checksum(h)

    rewrite(path, change)


DOCUMENT = "The lighthouse keeper counted ships every night. " * 12


def tiny_service(char_tokenizer, disk_bytes=10**9, cpu_bytes=0):
    from kvcli.serve.service import ModelService

    _, ours = tiny_llama(8, 2, layers=2)
    model = LoadedModel(ours, char_tokenizer, "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)
    tiers = [Tier("cpu", cpu_bytes, math.inf), Tier("disk", disk_bytes, 1e8, encoded=True)]
    m = CacheManager(tiers, ModelService.shape_of(model), prefill_seconds_per_token=1e-4)
    return ModelService(model, m, profile=False)


def lively_model(scale: float = 20.0) -> LoadedModel:
    """A tiny random Llama on CharTokenizer whose answers depend on the question and the
    cache (weights scaled up: at the default initialisation every answer is one repeated
    letter, so a wrong cache would go unnoticed). The same weights in every process."""
    _, ours = tiny_llama(8, 2, layers=2)
    with torch.no_grad():
        for weight in ours.parameters():
            if weight.dim() > 1:
                weight.mul_(scale)
    return LoadedModel(ours, CharTokenizer(), "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)


def two_page_document(text: str = DOCUMENT, name: str = "notes.txt"):
    """`text` as a Document of two pages (split in the middle), without a file."""
    import hashlib

    from kvcli.documents import Document, PageSpan

    middle = len(text) // 2
    return Document(name, text, hashlib.sha256(text.encode()).hexdigest(), [PageSpan(1, 0, middle), PageSpan(2, middle, len(text))])


def ask(service, body):
    """One request as the HTTP layer runs it: check the body, read the document, answer, then
    settle placement."""
    from kvcli.serve.requests import ask_request

    request = ask_request(body)
    document = service.read_document(request.source)
    with service.turn():
        try:
            return service.ask(request, document, None)
        finally:
            service.after_request()


def run_kvcli(args, env_extra=None, stdin=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvcli.cli.main", *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


def join(table: dict, header: dict | str, body: bytes, *, sign: bool = True) -> bytes:
    """A .kvc file from its parts; `sign` recomputes the header checksum (a forger can)."""
    if isinstance(header, dict):
        if sign:
            header = {**header, "header_checksum": canonical_checksum(header)}
        header = json.dumps(header)
    return frame(json.dumps({"__metadata__": {"kvcli": header}, **table}).encode(), body)


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(tensor table without metadata, kvcli header, data section) of a .kvc file's bytes."""
    (hlen,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + hlen])
    header = json.loads(table.pop("__metadata__")["kvcli"])
    return table, header, data[8 + hlen :]


def error_of(source, **kwargs) -> str:
    """Load `source`, expecting a KvcliError; return its message, checked to be one line."""
    with pytest.raises(KvcliError) as info:
        load_document(str(source), **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message
    return message


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def raw(url, method, path, body: bytes | None = None, headers=None, *, token=True, json_type=True):
    """One request with the server's token and a JSON content type unless told otherwise."""
    parts = urlsplit(url)
    sent = {}
    if token:
        sent["Authorization"] = f"Bearer {Client(url).token}"
    if json_type and body is not None:
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def stall_document_loads(monkeypatch, only: str | None = None) -> tuple[threading.Event, threading.Event]:
    """Make the service's document loads (of `only`, else every one) wait, as a FIFO or a slow
    network file does: (entered, release): `entered` is set when a request is inside one,
    which then waits for `release` (at most 60 s)."""
    from kvcli.serve import service as service_module

    entered, release = threading.Event(), threading.Event()
    load = service_module.load_document

    def stuck(source, **kwargs):
        if only is None or source == only:
            entered.set()
            release.wait(60)
        return load(source, **kwargs)

    monkeypatch.setattr(service_module, "load_document", stuck)
    return entered, release


def ask_body(**extra):
    return {"text": DOCUMENT, "question": "Who counted?", "max_new_tokens": 6, **extra}


def wait_idle(service, seconds=60.0):
    """The last request leaves its turn just after the client has read its final event."""
    deadline = time.monotonic() + seconds
    while service.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.pending == 0


def keep_pages(compressed, pages: set[int]):
    """`compressed` with every document row of the other pages evicted, in every head
    (citation and kept-map tests: what a cache that kept only those pages looks like)."""
    from kvcli.compress.reading import Compressed

    doc_start = len(compressed.layout.prefix_ids)
    page_of = compressed.pages.page_index()
    layers = []
    for layer in compressed.cache.layers:
        keys, values, positions = [], [], []
        for h in range(layer.num_kv_heads):
            k, v, p = layer.head_rows(0, h)
            doc = (p.long() - doc_start).clamp(0, len(page_of) - 1)
            keep = (p < doc_start) | torch.isin(page_of[doc], torch.tensor(sorted(pages)))
            keys.append(k[keep]), values.append(v[keep]), positions.append(p[keep])
        layers.append(LayerCache.from_heads(keys, values, positions))
    cache = CompressedCache(layers, compressed.cache.next_position.clone(), compressed.cache.original_length)
    return Compressed(cache=cache, layout=compressed.layout, press=compressed.press, agnostic=True,
                      document_tokens=compressed.document_tokens, pages=compressed.pages)
