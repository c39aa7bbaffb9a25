"""The .kvc cache file: exact round trips, quantized round trips, and every way a file can break."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import kvcli
from kvcli.cache import DEFAULT_HEADROOM, CompressedCache
from kvcli.errors import KvcliError
from kvcli.store import kvcfile as cachefile
from kvcli.store.header import canonical_checksum
from kvcli.store.kvcfile import load_cache, read_header, save_cache
from kvcli.store.quantize import dequantize, quantize
from tests.support import (
    FINGERPRINT,
    as_version_1,
    header_length,
    make_cache,
    make_header,
    rewrite,
    tensor_chunks,
)


def assert_same(a: CompressedCache, b: CompressedCache, *, atol: float = 0.0, dtype: torch.dtype | None = None) -> None:
    assert len(a.layers) == len(b.layers)
    assert a.original_length == b.original_length
    assert a.next_position.tolist() == b.next_position.tolist()
    for la, lb in zip(a.layers, b.layers):
        assert la.lengths[0].tolist() == lb.lengths[0].tolist()
        for h in range(la.num_kv_heads):
            ka, va, pa = la.head_rows(0, h)
            kb, vb, pb = lb.head_rows(0, h)
            assert torch.equal(pa, pb)
            if dtype is not None:
                ka, va = ka.to(dtype), va.to(dtype)
            assert kb.dtype == ka.dtype
            if atol == 0:
                assert torch.equal(ka, kb) and torch.equal(va, vb)
            else:
                torch.testing.assert_close(kb.float(), ka.float(), atol=atol, rtol=0)
                torch.testing.assert_close(vb.float(), va.float(), atol=atol, rtol=0)


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(tmp_path, dtype):
    cache = make_cache(dtype=dtype)
    path = tmp_path / "c.kvc"
    written = save_cache(path, cache, make_header())
    assert written == path.stat().st_size
    loaded, header = load_cache(path)
    assert_same(cache, loaded)
    for layer in loaded.layers:
        assert layer.keys.dtype == dtype
        # fresh headroom after every head's kept rows
        assert (layer.capacity_per_head - layer.lengths[0]).tolist() == [DEFAULT_HEADROOM] * layer.num_kv_heads
        assert (layer.positions[0] == -1).sum() == DEFAULT_HEADROOM * layer.num_kv_heads
    assert loaded.kept_per_head().tolist() == cache.kept_per_head().tolist()
    assert header.kv_dtype == {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def test_only_rows_in_use_are_stored(tmp_path):
    cache = make_cache(headroom=1000)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header())
    tensors = st_load(path.read_bytes())
    for i, layer in enumerate(cache.layers):
        total = int(layer.lengths.sum())
        assert tensors[f"layer.{i}.keys"].shape == (total, 64)
        assert tensors[f"layer.{i}.positions"].shape == (total,)
        assert tensors[f"layer.{i}.lengths"].tolist() == layer.lengths[0].tolist()
        rows = torch.cat([layer.head_rows(0, h)[0] for h in range(layer.num_kv_heads)])
        assert torch.equal(tensors[f"layer.{i}.keys"], rows)


@pytest.mark.parametrize("kv_dtype,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_cast_on_save(tmp_path, kv_dtype, dtype):
    cache = make_cache(dtype=torch.float32)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    loaded, header = load_cache(path)
    assert header.kv_dtype == kv_dtype
    assert_same(cache, loaded, dtype=dtype)
    loaded32, _ = load_cache(path, dtype=torch.float32)
    assert loaded32.layers[0].keys.dtype == torch.float32


def test_header_round_trip(tmp_path):
    cache = make_cache()
    path = tmp_path / "c.kvc"
    header = make_header()
    save_cache(path, cache, header)
    read = read_header(path)
    _, loaded = load_cache(path)
    assert read == loaded
    as_json = read.as_dict()
    for key, value in header.items():
        assert as_json[key] == value
    assert as_json["format"] == "kvcli-cache"
    assert read.format_version == 2
    assert read.kvcli_version == kvcli.__version__
    assert read.original_length == cache.original_length
    assert read.next_position == int(cache.next_position[0])
    assert read.num_layers == 3
    assert read.quantization is None
    assert [list(layer) for layer in read.lengths] == cache.kept_per_head().tolist()
    assert len(read.checksum) == 64
    # typed sections
    assert read.model.fingerprint == FINGERPRINT and read.model.num_kv_heads == 4
    assert read.document.name == "doc.pdf" and read.document.pages == ((1, 0, 100), (2, 100, 250))
    assert read.method.method == "snapkv" and read.method.ratio == 0.5 and read.method.budget == 20
    assert read.prefix_ids == (1, 2, 3, 4, 5, 6, 7)
    assert read.extra == {"unicode": header["unicode"]}
    assert "checksum" not in header  # the caller's dict is not modified


def test_loaded_cache_can_append(tmp_path):
    cache = make_cache()
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header())
    loaded, _ = load_cache(path)
    n = 5
    before = [layer.offsets.clone() for layer in loaded.layers]
    for layer, old in zip(loaded.layers, before):
        keys = torch.randn(1, layer.num_kv_heads, n, 64)
        layer.append(keys, keys * 2, torch.arange(n).unsqueeze(0) + int(loaded.next_position[0]))
        assert torch.equal(layer.offsets, old)  # fitted in the headroom, no reallocation
        for h in range(layer.num_kv_heads):
            k, v, p = layer.head_rows(0, h)
            assert torch.equal(k[-n:], keys[0, h])
            assert p[-n:].tolist() == list(range(int(loaded.next_position[0]), int(loaded.next_position[0]) + n))
    assert loaded.kept_per_head().tolist() == (cache.kept_per_head() + n).tolist()


def test_saves_a_sequence_view_and_rejects_batches(tmp_path):
    cache = make_cache()
    with pytest.raises(KvcliError, match="single-sequence"):
        save_cache(tmp_path / "b.kvc", cache.repeat(2), make_header())
    assert not (tmp_path / "b.kvc").exists()
    with pytest.raises(KvcliError, match="unknown kv dtype"):
        save_cache(tmp_path / "b.kvc", cache, make_header(), kv_dtype="int3")


# --------------------------------------------------------------------------- quantization


def _group_bound(x: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """The documented bound per value, from the data: [..., D]."""
    dim = x.shape[-1]
    padded = dim + (-dim) % group
    g = torch.nn.functional.pad(x.float(), (0, padded - dim)).reshape(*x.shape[:-1], padded // group, group)
    if bits == 8:
        bound = g.abs().amax(-1) / 254 * (1 + 2**-10)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        bound = ((hi - lo) + lo.abs() * 2**-10) / 30 * (1 + 2**-10)
    bound = bound + g.abs().amax(-1) * 2**-22 + 1e-30  # float32 dequantization rounding
    return bound.unsqueeze(-1).expand_as(g).reshape(*x.shape[:-1], padded)[..., :dim]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_error_bound(bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 128, generator=gen) * torch.logspace(-3, 2, 300).unsqueeze(1)
    x[0] = 0  # all-zero groups
    x[1] = 3.25  # constant groups
    x[2] = 100 + torch.randn(128, generator=gen) * 1e-3  # far from 0, tiny spread
    x[3, 5] = 500  # one outlier channel: only its group is coarse
    x[4] = -7.0 + torch.rand(128, generator=gen)
    parts = quantize(x, bits, 32)
    out = dequantize(*parts, bits=bits, group_size=32, dim=128)
    err = (out - x).abs()
    scale_bound = parts[1].float().repeat_interleave(32, -1) / 2 * (1 + 2**-20) + x.abs() * 2**-23
    assert bool((err <= scale_bound).all()), float((err - scale_bound).max())
    assert bool((err <= _group_bound(x, bits)).all())
    assert float(err[0].max()) == 0
    if bits == 8:
        assert parts[0].dtype == torch.int8 and parts[0].shape == (300, 128)
    else:
        assert parts[0].dtype == torch.uint8 and parts[0].shape == (300, 64)  # two codes a byte
        assert parts[2].shape == (300, 4)
    # the outlier coarsens only its own group of 32
    assert float(err[3, 32:].max()) <= float(err[3, 32:].abs().max() + _group_bound(x[3:4], bits)[0, 32:].max())


@pytest.mark.parametrize("kv_dtype,bits", [("int8", 8), ("int4", 4)])
def test_quantized_round_trip(tmp_path, kv_dtype, bits):
    cache = make_cache(num_layers=2, tokens=200, head_dim=128, dtype=torch.float16, headroom=2)
    ref = tmp_path / "fp16.kvc"
    path = tmp_path / f"{kv_dtype}.kvc"
    size16 = save_cache(ref, cache, make_header())
    size = save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    loaded, header = load_cache(path)
    assert header.kv_dtype == kv_dtype
    assert header.quantization.as_dict() == {"bits": bits, "group_size": 32, "scheme": "symmetric" if bits == 8 else "asymmetric"}
    assert loaded.layers[0].keys.dtype == torch.float16  # the source dtype by default
    assert loaded.next_position.tolist() == cache.next_position.tolist()
    for la, lb in zip(cache.layers, loaded.layers):
        assert la.lengths.tolist() == lb.lengths.tolist()
        for h in range(la.num_kv_heads):
            for a, b in zip(la.head_rows(0, h)[:2], lb.head_rows(0, h)[:2]):
                # the bound, plus the fp16 rounding of the dequantized value
                bound = _group_bound(a, bits) + a.float().abs() * 2**-10 + 6e-8
                assert bool(((b.float() - a.float()).abs() <= bound).all())
            assert torch.equal(la.head_rows(0, h)[2], lb.head_rows(0, h)[2])
    # sizes: payload D bytes + 2 per 32 (int8), D/2 + 4 per 32 (int4), vs 2D; plus positions
    ratio = size / size16
    expected = {8: (128 + 8) / 256, 4: (64 + 16) / 256}[bits]
    assert expected < ratio < expected + 0.04, ratio
    as32, _ = load_cache(path, dtype=torch.float32)
    assert as32.layers[0].keys.dtype == torch.float32


def test_quantized_odd_head_dim(tmp_path):
    cache = make_cache(head_dim=80)  # not a multiple of 32: the last group is padded
    for kv_dtype, bits in (("int8", 8), ("int4", 4)):
        path = tmp_path / f"{kv_dtype}.kvc"
        save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
        loaded, _ = load_cache(path)
        for la, lb in zip(cache.layers, loaded.layers):
            a, b = la.head_rows(0, 2)[0], lb.head_rows(0, 2)[0]
            assert b.shape == a.shape
            assert bool(((b - a).abs() <= _group_bound(a, bits)).all())


def test_quantize_refuses_non_finite(tmp_path):
    cache = make_cache()
    cache.layers[1].keys[0, 0, 0] = float("inf")
    with pytest.raises(KvcliError, match="non-finite"):
        save_cache(tmp_path / "c.kvc", cache, make_header(), kv_dtype="int8")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- broken files


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "c.kvc"
    save_cache(path, make_cache(), make_header())
    return path


def test_missing_and_not_a_file(tmp_path):
    with pytest.raises(KvcliError, match="does not exist"):
        load_cache(tmp_path / "nope.kvc")
    with pytest.raises(KvcliError, match="is not a file"):
        read_header(tmp_path)


def test_truncated(saved):
    data = saved.read_bytes()
    hlen = header_length(saved)
    cuts = [9, 8 + hlen // 2, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, (8 + hlen + len(data)) // 2, len(data) - 1]
    for cut in cuts:
        saved.write_bytes(data[:cut])
        for read in (load_cache, read_header):
            with pytest.raises(KvcliError) as e:
                read(saved)
            message = str(e.value)
            assert message.startswith(f"{saved} is truncated: {cut} bytes, expected"), message
            assert "\n" not in message
            if cut >= 8 + hlen:
                assert message.endswith(f"expected {len(data)}")
    for cut in (0, 3):
        saved.write_bytes(data[:cut])
        with pytest.raises(KvcliError, match="is not a kvcli cache file"):
            load_cache(saved)
    saved.write_bytes(data + b"\0")
    with pytest.raises(KvcliError, match="is corrupted"):
        load_cache(saved)


def test_flipped_data_byte(saved):
    data = bytearray(saved.read_bytes())
    start = 8 + header_length(saved)
    for where in (start, (start + len(data)) // 2, len(data) - 1):
        broken = bytearray(data)
        broken[where] ^= 0x01
        saved.write_bytes(broken)
        read_header(saved)  # the header is fine
        with pytest.raises(KvcliError, match=r"is corrupted \(checksum mismatch\)$"):
            load_cache(saved)


def test_flipped_header_bytes(saved):
    """Every single flipped byte of the header is a one-line KvcliError, never a wrong load.

    (The only flips that load are case flips of a hex digit in a JSON \\u escape, which
    decode to the very same header.)
    """
    data = saved.read_bytes()
    hlen = header_length(saved)
    original, header = load_cache(saved)
    harmless = 0
    fd = os.open(saved, os.O_RDWR)
    for where in range(0, 8 + hlen):
        for mask in (0x01, 0x20):
            os.pwrite(fd, bytes([data[where] ^ mask]), where)
            try:
                loaded, read = load_cache(saved)
            except KvcliError as e:
                message = str(e)
            else:
                assert read == header and chr(data[where]) in "abcdef"
                assert_same(original, loaded)
                harmless += 1
                continue
            finally:
                os.pwrite(fd, data[where : where + 1], where)
            assert "\n" not in message
            assert message.startswith(str(saved)), message
    os.close(fd)
    assert harmless < 20


def test_not_a_safetensors_file(tmp_path):
    for content in (b"", b"hello", b"hello world, this is plain text\n" * 10, bytes(range(256)) * 4, b'{"a": 1}'):
        path = tmp_path / "x.kvc"
        path.write_bytes(content)
        with pytest.raises(KvcliError, match=r"is not a kvcli cache file"):
            load_cache(path)


def test_safetensors_without_kvcli_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_save({"w": torch.zeros(3)}))
    with pytest.raises(KvcliError, match=rf"^{path} is not a kvcli cache file$"):
        load_cache(path)
    path.write_bytes(st_save({"w": torch.zeros(3)}, metadata={"format": "pt"}))
    with pytest.raises(KvcliError, match="is not a kvcli cache file"):
        read_header(path)
    path.write_bytes(st_save({"w": torch.zeros(3)}, metadata={"kvcli": json.dumps({"format": "other"})}))
    with pytest.raises(KvcliError, match="is not a kvcli cache file"):
        load_cache(path)
    path.write_bytes(st_save({"w": torch.zeros(3)}, metadata={"kvcli": "{not json"}))
    with pytest.raises(KvcliError, match="is corrupted: unreadable kvcli header"):
        load_cache(path)


def test_wrong_format_version(saved):
    rewrite(saved, lambda h: h.update(format_version=3))
    with pytest.raises(KvcliError, match=rf"^{saved} was written by format version 3; this kvcli reads versions 1 and 2$"):
        load_cache(saved)
    with pytest.raises(KvcliError, match="format version 3"):
        read_header(saved)


def test_checksum_v2_is_per_tensor(saved):
    """Version 2: sha256 over the sorted "name:sha256(tensor bytes)" lines."""
    import hashlib

    header = read_header(saved)
    chunks = tensor_chunks(saved)
    lines = "".join(f"{name}:{hashlib.sha256(chunks[name]).hexdigest()}\n" for name in sorted(chunks))
    assert header.checksum == hashlib.sha256(lines.encode()).hexdigest()
    assert cachefile._checksum_v2(chunks) == header.checksum
    assert cachefile._checksum_v1(chunks) != header.checksum  # the schemes never agree


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_reads_version_1_files(tmp_path, kv_dtype):
    cache = make_cache(dtype=torch.float16)
    path = tmp_path / "v1.kvc"
    save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    new, _ = load_cache(path)
    as_version_1(path)
    assert read_header(path).format_version == 1
    old, header = load_cache(path)
    assert header.format_version == 1
    assert_same(new, old)
    # and its data is still verified, with the old scheme
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(KvcliError, match=r"is corrupted \(checksum mismatch\)$"):
        load_cache(path)


def test_version_label_and_checksum_scheme_must_agree(saved):
    """A version-1 label over a version-2 digest (or the reverse) is a mismatch, never a load."""
    as_version_1(saved, v1_digest=False)
    with pytest.raises(KvcliError, match=r"is corrupted \(checksum mismatch\)$"):
        load_cache(saved)

    def v2_with_v1_digest(h):
        h["format_version"] = 2
        h["checksum"] = cachefile._checksum_v1(tensor_chunks(saved))
        h["header_checksum"] = canonical_checksum(h)

    rewrite(saved, v2_with_v1_digest)
    with pytest.raises(KvcliError, match=r"is corrupted \(checksum mismatch\)$"):
        load_cache(saved)


def test_loaded_tensors_do_not_alias_the_read_buffer(tmp_path, monkeypatch):
    """Reads are cut into many pieces on many threads; the result owns its memory."""
    monkeypatch.setattr(cachefile, "READ_CHUNK", 64)
    cache = make_cache(dtype=torch.bfloat16)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header())
    first, _ = load_cache(path)
    second, _ = load_cache(path)
    assert_same(cache, first)
    first.layers[0].keys.add_(1)
    assert_same(cache, second)
    for layer in first.layers:
        assert layer.keys.is_contiguous() and layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 2


@pytest.fixture
def streamed(monkeypatch):
    """The CUDA load path (page-locked slots, each tensor hashed as its pieces pass) forced
    on the CPU with slots of 96 bytes, so every tensor crosses many slots and the slots are
    reused many times over."""
    monkeypatch.setattr(cachefile, "_streams", lambda device, pin_memory, header: pin_memory is not False and header.format_version != 1)
    monkeypatch.setattr(cachefile, "STAGING_SLOT_MIN", 96)
    monkeypatch.setattr(cachefile, "STAGING_BYTES", 96 * 4)
    monkeypatch.setattr(cachefile, "_kept_staging", {})  # none kept from an earlier test
    pieces = []
    real = cachefile._Slot.upload
    monkeypatch.setattr(cachefile._Slot, "upload", lambda self, dst, n: pieces.append(n) or real(self, dst, n))
    return pieces


@pytest.mark.parametrize("kv_dtype", ["auto", "fp16", "int8", "int4"])
def test_streamed_load_equals_the_host_load(tmp_path, streamed, kv_dtype):
    cache = make_cache(num_layers=3, tokens=50, head_dim=64, dtype=torch.float32, headroom=2)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    loaded, _ = load_cache(path)
    assert len(streamed) > 40 and max(streamed) == 96  # it did stream, in slot-sized pieces
    streamed.clear()
    reference, _ = load_cache(path, pin_memory=False)  # the host-buffer path
    assert streamed == []
    assert_same(reference, loaded)
    if kv_dtype == "auto":
        assert_same(cache, loaded)


def test_streamed_load_verifies_every_piece(saved, streamed, monkeypatch):
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x01  # somewhere inside a tensor, not on a slot boundary
    saved.write_bytes(bytes(data))
    built = []
    monkeypatch.setattr(cachefile, "_layer", lambda *a, **k: built.append(1))
    with pytest.raises(KvcliError, match=r"is corrupted \(checksum mismatch\)$"):
        load_cache(saved)
    assert built == []


def test_streamed_load_falls_back_when_memory_cannot_be_locked(saved, streamed, monkeypatch):
    real = torch.empty

    def refuse_pinning(*args, **kwargs):
        if "pin_memory" in kwargs:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_pinning)
    loaded, _ = load_cache(saved)
    assert streamed == []  # nothing went through the slots
    monkeypatch.setattr(torch, "empty", real)
    assert_same(load_cache(saved, pin_memory=False)[0], loaded)


def test_staging_is_page_locked_once_per_process(saved, monkeypatch):
    """Page-locking and creating streams cost a fresh process's first load most of what it
    paid beyond a second one: the block is made once (prepare_staging, as a CUDA model load
    calls it) and every load after reuses it, for as long as STAGING_BYTES is unchanged."""
    monkeypatch.setattr(cachefile, "_streams", lambda device, pin_memory, header: True)
    monkeypatch.setattr(cachefile, "_kept_staging", {})
    blocks = []
    real = torch.empty

    def spy(*args, **kwargs):
        if "pin_memory" in kwargs:
            blocks.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    count, slot_bytes = cachefile._staging_shape()
    cachefile.prepare_staging("cpu")
    assert blocks == [count * slot_bytes] and count * slot_bytes <= cachefile.STAGING_BYTES
    first, _ = load_cache(saved)
    second, _ = load_cache(saved)
    assert blocks == [count * slot_bytes]
    assert_same(first, second)
    monkeypatch.setattr(cachefile, "STAGING_BYTES", cachefile.STAGING_BYTES // 2)  # another size: a new block
    load_cache(saved)
    count, slot_bytes = cachefile._staging_shape()
    assert blocks[1:] == [count * slot_bytes]


def test_concurrent_streamed_loads_do_not_share_slots(tmp_path, streamed, monkeypatch):
    """Two loads at once (the server's threads): the second finds the kept block taken and
    makes its own; both load the file correctly."""
    from concurrent.futures import ThreadPoolExecutor

    cache = make_cache(num_layers=3, tokens=50, head_dim=64, dtype=torch.float32, headroom=2)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header())
    taken = []
    real_take = cachefile._take_staging
    monkeypatch.setattr(cachefile, "_take_staging", lambda device: taken.append(id(s := real_take(device))) or s)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_cache(path)[0], range(8)))
    for one in loaded:
        assert_same(cache, one)
    assert len(taken) == 8 and len(cachefile._kept_staging) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kv_dtype", ["auto", "int4"])
def test_cuda_streamed_load_equals_the_pageable_load(tmp_path, kv_dtype):
    cache = make_cache(num_layers=4, tokens=3000, head_dim=128, dtype=torch.bfloat16, headroom=2)
    path = tmp_path / "c.kvc"
    save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    streamed, _ = load_cache(path, device="cuda")
    pageable, _ = load_cache(path, device="cuda", pin_memory=False)
    assert streamed.layers[0].keys.is_cuda
    assert_same(pageable, streamed)


def test_edited_header_is_detected(saved):
    rewrite(saved, lambda h: h.update(original_length=h["original_length"] + 1))
    with pytest.raises(KvcliError, match=r"is corrupted \(header checksum mismatch\)"):
        load_cache(saved)


def test_structural_damage_is_a_clean_error(saved):
    def drop_layer(h):
        h["num_layers"] = 2
        h["lengths"] = h["lengths"][:2]
        h["header_checksum"] = canonical_checksum(h)

    rewrite(saved, drop_layer)
    with pytest.raises(KvcliError, match="is corrupted: unexpected tensor layer.2"):
        load_cache(saved)


def test_expected_model(saved):
    loaded, header = load_cache(saved, expected_model=FINGERPRINT)
    other = "def456" + "0" * 58
    with pytest.raises(KvcliError) as e:
        load_cache(saved, expected_model=other)
    message = str(e.value)
    assert message == (
        f"{saved} was made by model SmolLM2-135M (fingerprint {FINGERPRINT[:12]}…); "
        f"the current model has fingerprint {other[:12]}…"
    )
    with pytest.raises(KvcliError, match=r"the current model is Qwen3-0.6B \(def4560000"):
        load_cache(saved, expected_model=other, expected_model_name="Qwen3-0.6B")


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_interrupt_keeps_old_file(saved, monkeypatch, where):
    old = saved.read_bytes()
    real_write = cachefile._write_chunks

    def half_then_interrupt(fileobj, data):
        real_write(fileobj, data[: len(data) // 2])
        raise KeyboardInterrupt

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "write":
        monkeypatch.setattr(cachefile, "_write_chunks", half_then_interrupt)
    elif where == "fsync":
        monkeypatch.setattr(cachefile.os, "fsync", interrupt)
    else:
        monkeypatch.setattr(cachefile.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_cache(saved, make_cache(seed=5), make_header("other.pdf"))
    monkeypatch.undo()
    assert saved.read_bytes() == old
    assert temp_files(saved.parent) == []
    load_cache(saved)


def test_disk_full(saved, monkeypatch):
    old = saved.read_bytes()

    def full(fileobj, data):
        fileobj.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cachefile, "_write_chunks", full)
    with pytest.raises(KvcliError, match=rf"^cannot write {saved}: disk full"):
        save_cache(saved, make_cache(seed=5), make_header())
    assert saved.read_bytes() == old
    assert temp_files(saved.parent) == []
    # a new target on a full disk: nothing left behind at all
    with pytest.raises(KvcliError, match="disk full"):
        save_cache(saved.parent / "new.kvc", make_cache(seed=5), make_header())
    assert sorted(os.listdir(saved.parent)) == ["c.kvc"]


def test_unwritable_directory(tmp_path):
    with pytest.raises(KvcliError, match="cannot write"):
        save_cache(tmp_path / "missing" / "c.kvc", make_cache(), make_header())


def _race_writer(path: str, seed: int, rounds: int, barrier) -> None:
    torch.set_num_threads(1)
    cache = make_cache(seed=seed, tokens=300, head_dim=64)
    barrier.wait()
    for _ in range(rounds):
        save_cache(path, cache, make_header(f"seed{seed}"))


def test_two_writers_race(tmp_path):
    path = tmp_path / "c.kvc"
    caches = {seed: make_cache(seed=seed, tokens=300, head_dim=64) for seed in (1, 2)}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race_writer, args=(str(path), seed, 60, barrier)) for seed in caches]
    for p in procs:
        p.start()
    seen = set()
    # read while they write: every file we can see is complete
    while any(p.is_alive() for p in procs):
        if path.exists():
            loaded, header = load_cache(path)
            seed = int(header.document.name[4:])
            assert_same(caches[seed], loaded)
            seen.add(seed)
        time.sleep(0.01)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    loaded, header = load_cache(path)
    assert_same(caches[int(header.document.name[4:])], loaded)
    assert temp_files(tmp_path) == []


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from support import make_cache, make_header
    from kvcli.store.kvcfile import save_cache
    cache = make_cache(seed=9, num_layers=4, num_heads=4, tokens=1500, head_dim=128)
    print("ready", flush=True)
    while True:
        save_cache({path!r}, cache, make_header("new"))
    """
)


def test_sigkill_during_write(tmp_path):
    path = tmp_path / "c.kvc"
    old_cache = make_cache(seed=3)
    save_cache(path, old_cache, make_header("old"))
    new_cache = make_cache(seed=9, num_layers=4, num_heads=4, tokens=1500, head_dim=128)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    outcomes = []
    for delay in (0.02, 0.15, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-write: the target is still whole
            loaded, header = load_cache(path)
            assert_same(old_cache if header.document.name == "old" else new_cache, loaded)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        loaded, header = load_cache(path)
        outcomes.append(header.document.name)
        assert_same(old_cache if header.document.name == "old" else new_cache, loaded)
        # a killed writer cannot clean up: its one temp file may remain, never under the target name
        for name in temp_files(tmp_path):
            assert name.startswith(".c.kvc.tmp-")
            (tmp_path / name).unlink()


# --------------------------------------------------------------------------- answers after a round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_answers_from_the_file_equal_answers_from_memory(tmp_path, dtype, char_tokenizer):
    """A KVzip cache saved and loaded decodes exactly the tokens the in-memory cache decodes."""
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill
    from kvcli.generate import decode, forward
    from kvcli.prompts import PromptLayout
    from tests.support import tiny_llama

    _, model = tiny_llama(8, 2, layers=2)
    model.to(dtype)
    layout = PromptLayout.build(char_tokenizer, "The keeper's dog was called Biscuit and slept by the lamp. " * 3, None)
    cache = prefill(model, layout, make_press("kvzip", ratio=0.4)).cache
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, make_header())
    loaded, _ = load_cache(path, dtype=dtype)
    question = torch.tensor([layout.question_part("Who slept by the lamp?")])
    answers = []
    for c in (cache, loaded):
        first = forward(model, c, question)
        answers.append(decode(model, c, first, max_new_tokens=8, stop_ids=set()))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("kv_dtype,bound", [("int8", 0.01), ("int4", 0.1)])  # measured 0.0013 and 0.017
def test_quantized_files_answer_with_a_bounded_logit_error(tmp_path, kv_dtype, bound, char_tokenizer):
    """int8/int4 are lossy: the next-token logits after the question move by a bounded relative error."""
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill
    from kvcli.generate import forward
    from kvcli.prompts import PromptLayout
    from tests.support import tiny_llama

    _, model = tiny_llama(8, 2, layers=2)
    layout = PromptLayout.build(char_tokenizer, "The keeper's dog was called Biscuit and slept by the lamp. " * 3, None)
    cache = prefill(model, layout, make_press("kvzip", ratio=0.4)).cache
    path = tmp_path / "doc.kvc"
    save_cache(path, cache, make_header(), kv_dtype=kv_dtype)
    loaded, _ = load_cache(path)
    question = torch.tensor([layout.question_part("Who slept by the lamp?")])
    exact, lossy = forward(model, cache.clone(), question), forward(model, loaded, question)
    error = ((lossy - exact).norm() / exact.norm()).item()
    assert 0 < error < bound, error
