"""The .kvc file: one compressed KV cache on disk, as a plain safetensors file.

Layout (a valid safetensors file, loadable without running any code):

    layer.{i}.lengths    int32 [Hkv]          rows kept per KV head
    layer.{i}.positions  int32 [total]        original RoPE position of every kept row
    layer.{i}.keys       [total, D]           kept rows, head after head (no headroom)
    layer.{i}.values     [total, D]
  quantized (int8 / int4) instead:
    layer.{i}.keys       int8 [total, Dp] | uint8 [total, Dp/2] (int4: two codes a byte)
    layer.{i}.keys.scales fp16 [total, Dp/32]
    layer.{i}.keys.zeros  fp16 [total, Dp/32]  (int4 only: the per-group offset)
    (same for values)

The safetensors metadata holds {"kvcli": json} = the caller's header plus the keys this
module adds (format, format_version, checksum, lengths, ...) and `header_checksum`, a
sha256 over the canonical JSON of the header itself, so any flipped byte is reported,
never loaded. `checksum` covers the bytes of every tensor:

  format_version 2 (written now): sha256 of the text  "{name}:{sha256 of its bytes}\n"
      for every tensor in sorted name order; the per-tensor hashes run in parallel
      (one thread a core: hashlib releases the GIL), overlapped with the device upload.
  format_version 1 (still read): one sha256 stream over the bytes of every tensor in
      sorted name order (single-threaded, so slower to verify).

The two schemes give different digests for the same bytes and format_version is under
`header_checksum`, so a file cannot pass one scheme's check with the other's digest.

Loading reads the data section once into one buffer (parallel preads on the one open
file, so a concurrent atomic replace cannot mix two files), views the tensors in place,
uploads each layer's rows as stored (one copy per tensor), and builds the flat layout
with headroom (and dequantizes int8/int4) on the target device. The returned cache is
only handed back once the checksum has been verified.

Writes are atomic: a temp file in the same directory, fsync, os.replace, fsync of the
directory. A crash, a Ctrl-C or a full disk leaves the previous file untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import kvcli
from kvcli.cache import DEFAULT_HEADROOM, CompressedCache, LayerCache
from kvcli.errors import KvcliError
from kvcli.store.quantize import dequantize, quantize

FORMAT = "kvcli-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "kvcli"
# Values per quantization group along head_dim: divides every common head_dim (64, 96,
# 128, 256; others are zero-padded), keeps the fp16 scale overhead at 0.5 bit per value
# (int4 with its offset: 1 bit), and confines an outlier channel to its 32 neighbours.
# Same choice as llama.cpp's Q8_0/Q4_1 blocks.
GROUP_SIZE = 32
# safetensors refuses headers over 100 MB; anything bigger is not one of our files.
MAX_HEADER_BYTES = 100_000_000
WRITE_CHUNK = 8 << 20
# Reads are cut into pieces of this size so every core has some to do.
READ_CHUNK = 16 << 20

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_BITS = {"int8": 8, "int4": 4}
KV_DTYPES = ("auto", *_DTYPES, *_BITS)
# safetensors dtype codes we accept, and their element sizes.
_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}


# --------------------------------------------------------------------------- helpers


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, as safetensors writes them."""
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def _checksum_v1(chunks: dict[str, memoryview | bytes]) -> str:
    """format_version 1: one sha256 stream over every tensor's bytes, sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(chunks):
        digest.update(chunks[name])
    return digest.hexdigest()


def _tensor_digest(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _combine_digests(digests: dict[str, str]) -> str:
    """format_version 2: sha256 over the sorted "{name}:{per-tensor sha256}" lines."""
    text = "".join(f"{name}:{digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum_v2(chunks: dict[str, memoryview | bytes], pool: ThreadPoolExecutor | None = None) -> str:
    """format_version 2 checksum, every tensor hashed on its own thread."""
    if pool is None:
        with ThreadPoolExecutor(max_workers=min(_threads(), max(1, len(chunks)))) as own:
            return _checksum_v2(chunks, own)
    futures = {name: pool.submit(_tensor_digest, data) for name, data in chunks.items()}
    return _combine_digests({name: f.result() for name, f in futures.items()})


def _checksum(chunks: dict[str, memoryview | bytes], version: int = FORMAT_VERSION) -> str:
    return _checksum_v1(chunks) if version == 1 else _checksum_v2(chunks)


def _header_checksum(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _used_rows(layer: LayerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch row 0's rows in use, head after head: keys, values [total, D], positions [total], lengths [Hkv]."""
    lengths = layer.lengths[0].detach().to("cpu", torch.int32)
    offsets = layer.offsets.detach().to("cpu", torch.int64)
    capacity = offsets[1:] - offsets[:-1]
    if bool((lengths < 0).any()) or bool((lengths.long() > capacity).any()):
        raise ValueError("layer lengths exceed their segments")
    index = torch.cat(
        [torch.arange(int(o), int(o) + int(n), dtype=torch.int64) for o, n in zip(offsets[:-1], lengths)]
        or [torch.zeros(0, dtype=torch.int64)]
    )
    keys = layer.keys[0].detach().to("cpu")[index]
    values = layer.values[0].detach().to("cpu")[index]
    positions = layer.positions[0].detach().to("cpu", torch.int32)[index]
    return keys, values, positions, lengths


def _write_chunks(fileobj, data: bytes) -> None:
    """Write all of `data` (in chunks, so a Ctrl-C is seen between them)."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_CHUNK):
        fileobj.write(view[start : start + WRITE_CHUNK])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the replace itself is done
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a same-directory temp file, fsync, os.replace and a directory
    fsync: a crash, Ctrl-C or full disk leaves the old file or the new one, never a mix.
    Failures are one-line KvcliErrors naming the path."""
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _write_error(path, e, len(data)) from e
    try:
        with os.fdopen(fd, "wb") as fileobj:
            _write_chunks(fileobj, data)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e, len(data)) from e
        raise
    _fsync_dir(directory)


def _write_error(path: Path, e: OSError, size: int) -> KvcliError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return KvcliError(f"cannot write {path}: disk full ({size:,} bytes needed); free some space or choose another path")
    return KvcliError(f"cannot write {path}: {e.strerror or e}")


# --------------------------------------------------------------------------- save


def save_cache(path: str | os.PathLike, cache: CompressedCache, header: dict, *, kv_dtype: str = "auto") -> int:
    """Write batch row 0 of `cache` (only the rows in use) to `path` as a .kvc file.

    kv_dtype: "auto" (the cache's dtype), "bf16", "fp16", "fp32" (cast), or "int8" /
    "int4" (lossy, per group of 32 along head_dim, see kvcli.store.quantize). `header` is any
    JSON-serializable dict; it is stored with the keys this module adds (which win on a
    clash). Returns the number of bytes written. Atomic: see the module docstring.
    """
    path = Path(path)
    if kv_dtype not in KV_DTYPES:
        raise KvcliError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if cache.batch_size != 1 or any(layer.keys.shape[0] != 1 for layer in cache.layers):
        raise KvcliError(f"cannot save {path}: only a single-sequence cache can be saved (batch size {cache.batch_size})")
    if not cache.layers:
        raise KvcliError(f"cannot save {path}: the cache has no layers")
    source_dtype = cache.layers[0].keys.dtype
    if source_dtype not in _DTYPE_NAMES:
        raise KvcliError(f"cannot save {path}: unsupported cache dtype {source_dtype}")
    if kv_dtype == "auto":
        kv_dtype = _DTYPE_NAMES[source_dtype]
    bits = _BITS.get(kv_dtype)
    head_dim = int(cache.layers[0].keys.shape[-1])

    tensors: dict[str, torch.Tensor] = {}
    lengths_all: list[list[int]] = []
    for i, layer in enumerate(cache.layers):
        keys, values, positions, lengths = _used_rows(layer)
        if keys.shape[-1] != head_dim:
            raise KvcliError(f"cannot save {path}: layer {i} has head_dim {keys.shape[-1]}, layer 0 has {head_dim}")
        tensors[f"layer.{i}.lengths"] = lengths.contiguous()
        tensors[f"layer.{i}.positions"] = positions.contiguous()
        lengths_all.append([int(n) for n in lengths])
        for name, rows in (("keys", keys), ("values", values)):
            if bits is None:
                tensors[f"layer.{i}.{name}"] = rows.to(_DTYPES[kv_dtype]).contiguous()
                continue
            try:
                parts = quantize(rows, bits, GROUP_SIZE)
            except ValueError as e:
                raise KvcliError(f"cannot save {path} as {kv_dtype}: {e}; use --kv-dtype fp16 or bf16") from e
            tensors[f"layer.{i}.{name}"] = parts[0].contiguous()
            tensors[f"layer.{i}.{name}.scales"] = parts[1].contiguous()
            if bits == 4:
                tensors[f"layer.{i}.{name}.zeros"] = parts[2].contiguous()

    full = json.loads(json.dumps(header))  # a copy, normalised as it will read back
    full.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        kvcli_version=kvcli.__version__,
        kv_dtype=kv_dtype,
        source_dtype=_DTYPE_NAMES[source_dtype],
        head_dim=head_dim,
        original_length=int(cache.original_length),
        next_position=int(cache.next_position.reshape(-1)[0]),
        num_layers=len(cache.layers),
        quantization=None if bits is None else {"bits": bits, "group_size": GROUP_SIZE, "scheme": "symmetric" if bits == 8 else "asymmetric"},
        lengths=lengths_all,
        checksum=_checksum({name: _tensor_bytes(t) for name, t in tensors.items()}),
    )
    full["header_checksum"] = _header_checksum(full)

    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(full, ensure_ascii=True)})
    atomic_write(path, data)
    return len(data)


# --------------------------------------------------------------------------- load


def _open(path: Path):
    if not path.exists():
        raise KvcliError(f"{path} does not exist")
    if not path.is_file():
        raise KvcliError(f"{path} is not a file")
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise KvcliError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(path: Path, f) -> tuple[dict, dict, int, int]:
    """Validate the framing and kvcli header of the open file `f`.

    Returns (kvcli header, safetensors tensor table, data start, data length). Only the
    header is read; the tensors are read later from the same open file.
    """
    try:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise KvcliError(f"{path} is not a kvcli cache file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > MAX_HEADER_BYTES:
            raise KvcliError(f"{path} is not a kvcli cache file")
        first = f.read(1)
        if first != b"{":
            raise KvcliError(f"{path} is not a kvcli cache file")
        if size < 8 + header_len:
            raise KvcliError(f"{path} is truncated: {size} bytes, expected at least {8 + header_len}")
        raw = first + _read_exactly(f, header_len - 1)
    except OSError as e:
        raise KvcliError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) < header_len:
        raise KvcliError(f"{path} is truncated: {8 + len(raw)} bytes, expected at least {8 + header_len}")
    looks_ours = FORMAT.encode() in raw
    try:
        table = json.loads(raw.decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("the safetensors header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        if looks_ours:
            raise KvcliError(f"{path} is corrupted: unreadable header ({e})") from None
        raise KvcliError(f"{path} is not a kvcli cache file") from None
    meta = table.pop("__metadata__", None)
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        if looks_ours:
            raise KvcliError(f"{path} is corrupted: no kvcli header")
        raise KvcliError(f"{path} is not a kvcli cache file")
    try:
        header = json.loads(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (TypeError, ValueError) as e:
        raise KvcliError(f"{path} is corrupted: unreadable kvcli header ({e})") from None
    if header.get("format") != FORMAT:
        raise KvcliError(f"{path} is not a kvcli cache file")
    version = header.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise KvcliError(f"{path} was written by format version {version}; this kvcli reads versions {readable}")
    try:
        end = max([int(spec["data_offsets"][1]) for spec in table.values()] or [0])
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise KvcliError(f"{path} is corrupted: bad tensor table ({e!r})") from None
    expected = 8 + header_len + end
    if size < expected:
        raise KvcliError(f"{path} is truncated: {size} bytes, expected {expected}")
    if size > expected:
        raise KvcliError(f"{path} is corrupted: {size} bytes, expected {expected} ({size - expected} trailing bytes)")
    if header.get("header_checksum") != _header_checksum(header):
        raise KvcliError(f"{path} is corrupted (header checksum mismatch)")
    return header, table, 8 + header_len, end


def _read_exactly(f, n: int) -> bytes:
    parts = []
    while n > 0:
        part = f.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _check_model(path: Path, header: dict, expected_model: str | None, expected_name: str | None) -> None:
    if expected_model is None:
        return
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    found = str(model.get("fingerprint", ""))
    if found == expected_model:
        return
    name = model.get("name", "an unknown model")
    current = f"is {expected_name} ({expected_model[:12]}…)" if expected_name else f"has fingerprint {expected_model[:12]}…"
    raise KvcliError(f"{path} was made by model {name} (fingerprint {found[:12] or '?'}…); the current model {current}")


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of a .kvc file, without reading its tensors."""
    path = Path(path)
    with _open(path) as f:
        header, _, _, _ = _parse(path, f)
    return header


def load_cache(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    expected_model: str | None = None,
    expected_model_name: str | None = None,
    headroom: int = DEFAULT_HEADROOM,
    pin_memory: bool | None = None,
) -> tuple[CompressedCache, dict]:
    """Read a .kvc file back into a single-sequence CompressedCache with fresh headroom.

    dtype: the compute dtype of the returned keys/values (torch dtype or "fp16"/"bf16"/
    "fp32"); default: the stored dtype, or for int8/int4 files the dtype the cache had
    when it was saved (`source_dtype`). expected_model: the current model's fingerprint;
    a file made by another model is refused (expected_model_name only improves the message).
    pin_memory: read into page-locked memory before a CUDA upload (default: see PIN_MEMORY).
    Every failure is a one-line KvcliError.
    """
    path = Path(path)
    with _open(path) as f:
        header, table, data_start, data_len = _parse(path, f)
        _check_model(path, header, expected_model, expected_model_name)
        try:
            return _build(path, header, table, f, data_start, data_len, device, dtype, headroom, pin_memory), header
        except KvcliError:
            raise
        except Exception as e:  # anything structural we did not foresee: never a traceback
            raise KvcliError(f"{path} is corrupted: {type(e).__name__}: {e}") from None


def _resolve_dtype(path: Path, dtype, header: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype
    if name is None:
        name = header["source_dtype"] if header["kv_dtype"] in _BITS else header["kv_dtype"]
    if name not in _DTYPES:
        raise KvcliError(f"{path}: unknown dtype {name!r}")
    return _DTYPES[name]


# Read into page-locked memory before a CUDA upload: the upload then runs at PCIe speed
# and overlaps nothing on the host. Page-locking is paid per fresh buffer (torch caches
# freed pinned blocks, so repeated loads in one process reuse it). H100, 0.8 GiB file, warm:
# 0.08 s pinned vs 0.26 s pageable (BENCHMARKS.md, issue 4).
PIN_MEMORY = True
_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


class _ReadError(KvcliError):
    """The file could not be read (reported as is, never as a checksum mismatch)."""


def _pread_into(path: Path, fd: int, buf: memoryview, data_start: int, begin: int, end: int) -> None:
    """Fill buf[begin:end] with the file's bytes at data_start + begin (GIL released)."""
    pos = begin
    while pos < end:
        want = buf[pos:end]
        try:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [want], data_start + pos)
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, len(want), data_start + pos)
                got = len(chunk)
                want[:got] = chunk
        except OSError as e:
            raise _ReadError(f"cannot read {path}: {e.strerror or e}") from None
        if got <= 0:
            raise _ReadError(f"{path} is truncated: no data at byte {data_start + pos}")
        pos += got


def _wait(futures) -> None:
    for future in futures:
        future.result()


def _hash_after(reads, data: memoryview) -> str:
    _wait(reads)
    return _tensor_digest(data)


def _hash_v1_after(reads, chunks: dict[str, memoryview]) -> str:
    _wait(reads)
    return _checksum_v1(chunks)


def _build(path, header, table, f, data_start, data_len, device, dtype, headroom, pin_memory) -> CompressedCache:
    def corrupt(reason: str) -> KvcliError:
        return KvcliError(f"{path} is corrupted: {reason}")

    kv_dtype = header.get("kv_dtype")
    if kv_dtype not in _DTYPES and kv_dtype not in _BITS:
        raise corrupt(f"unknown kv_dtype {kv_dtype!r}")
    bits = _BITS.get(kv_dtype)
    num_layers = header["num_layers"]
    head_dim = header["head_dim"]
    lengths_all = header["lengths"]
    if not (isinstance(num_layers, int) and num_layers > 0 and isinstance(head_dim, int) and head_dim > 0):
        raise corrupt("bad num_layers / head_dim")
    if not (isinstance(lengths_all, list) and len(lengths_all) == num_layers):
        raise corrupt("lengths do not match num_layers")
    group = padded = 0
    if bits is not None:
        quant = header.get("quantization") or {}
        if quant.get("bits") != bits or not isinstance(quant.get("group_size"), int) or quant["group_size"] <= 0:
            raise corrupt("bad quantization parameters")
        group = quant["group_size"]
        padded = -(-head_dim // group) * group
    compute = _resolve_dtype(path, dtype, header)
    device = torch.device(device)

    # The exact tensor table we expect, checked before touching the data.
    expected: dict[str, tuple[str, list[int]]] = {}
    layer_names: list[list[str]] = []
    for i, lengths in enumerate(lengths_all):
        if not (isinstance(lengths, list) and lengths and all(type(n) is int and n >= 0 for n in lengths)):
            raise corrupt(f"bad lengths for layer {i}")
        total = sum(lengths)
        names = [f"layer.{i}.lengths", f"layer.{i}.positions"]
        expected[names[0]] = ("I32", [len(lengths)])
        expected[names[1]] = ("I32", [total])
        for name in ("keys", "values"):
            if bits is None:
                expected[f"layer.{i}.{name}"] = ({"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[kv_dtype], [total, head_dim])
                names.append(f"layer.{i}.{name}")
            else:
                width = padded if bits == 8 else padded // 2
                expected[f"layer.{i}.{name}"] = ("I8" if bits == 8 else "U8", [total, width])
                expected[f"layer.{i}.{name}.scales"] = ("F16", [total, padded // group])
                names += [f"layer.{i}.{name}", f"layer.{i}.{name}.scales"]
                if bits == 4:
                    expected[f"layer.{i}.{name}.zeros"] = ("F16", [total, padded // group])
                    names.append(f"layer.{i}.{name}.zeros")
        layer_names.append(names)
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    if missing:
        raise corrupt(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise corrupt(f"unexpected tensor {extra[0]}")
    spans: dict[str, tuple[int, int]] = {}
    for name, (st_dtype, shape) in expected.items():
        spec = table[name]
        if not isinstance(spec, dict) or spec.get("dtype") != st_dtype or spec.get("shape") != shape:
            got = spec if not isinstance(spec, dict) else f"{spec.get('dtype')} {spec.get('shape')}"
            raise corrupt(f"tensor {name} is {got}, expected {st_dtype} {shape}")
        begin, end = spec["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len and end - begin == numel * _ST_SIZES[st_dtype]):
            raise corrupt(f"tensor {name} has bad data offsets")
        spans[name] = (begin, end)

    # One buffer for the data section, filled by parallel preads of the one open file.
    cuda = device.type == "cuda"
    pin = cuda and (PIN_MEMORY if pin_memory is None else bool(pin_memory))
    buf = torch.empty(data_len, dtype=torch.uint8, pin_memory=pin)
    raw = memoryview(buf.numpy()) if data_len else memoryview(bytearray())
    chunks = {name: raw[b:e] for name, (b, e) in spans.items()}
    version = header["format_version"]
    fd = f.fileno()
    pool = ThreadPoolExecutor(max_workers=_threads())
    try:
        # Per layer: its reads, then (v2) the hash of each tensor once its reads are done.
        # Workers take tasks in order, so a hash task never waits on a read not yet taken.
        reads: dict[str, list] = {}
        hashes: dict[str, object] = {}
        for names in layer_names:
            for name in names:
                begin, end = spans[name]
                reads[name] = [
                    pool.submit(_pread_into, path, fd, raw, data_start, a, min(a + READ_CHUNK, end))
                    for a in range(begin, end, READ_CHUNK)
                ]
            if version != 1:
                for name in names:
                    hashes[name] = pool.submit(_hash_after, reads[name], chunks[name])
        if version == 1:
            whole = pool.submit(_hash_v1_after, [r for rs in reads.values() for r in rs], chunks)

        def tensor(name: str) -> torch.Tensor:
            begin, end = spans[name]
            st_dtype, shape = expected[name]
            t = buf[begin:end]
            if begin % _ST_SIZES[st_dtype]:
                t = t.clone()  # misaligned (not written by safetensors): copy, then view
            return t.view(_ST_TORCH[st_dtype]).view(shape)

        def upload(t: torch.Tensor) -> torch.Tensor:
            return t if device.type == "cpu" else t.to(device, non_blocking=pin)

        layers: list[LayerCache] = []
        problem: BaseException | None = None
        try:
            for i, (names, lengths) in enumerate(zip(layer_names, lengths_all)):
                _wait(r for name in names for r in reads[name])
                if tensor(f"layer.{i}.lengths").tolist() != lengths:
                    raise corrupt(f"layer {i} lengths disagree with the header")
                rows = {}
                for name in ("keys", "values"):
                    base = f"layer.{i}.{name}"
                    if bits is None:
                        rows[name] = upload(tensor(base))
                    else:
                        rows[name] = dequantize(
                            upload(tensor(base)),
                            upload(tensor(base + ".scales")),
                            upload(tensor(base + ".zeros")) if bits == 4 else None,
                            bits=bits,
                            group_size=group,
                            dim=head_dim,
                            dtype=compute,
                        )
                positions = upload(tensor(f"layer.{i}.positions"))
                layers.append(_layer(rows["keys"], rows["values"], positions, lengths, headroom, device, compute))
        except _ReadError:
            raise
        except Exception as e:  # reported after the checksum: damaged data says "checksum mismatch"
            problem = e

        # Nothing is handed back before every byte is verified.
        if version == 1:
            digest = whole.result()
        else:
            digest = _combine_digests({name: future.result() for name, future in hashes.items()})
        if digest != header.get("checksum"):
            raise KvcliError(f"{path} is corrupted (checksum mismatch)")
        if problem is not None:
            raise problem
        if pin:
            torch.cuda.current_stream(device).synchronize()  # the uploads read `buf`
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    next_position = int(header["next_position"])
    original_length = int(header["original_length"])
    return CompressedCache(
        layers=layers,
        next_position=torch.tensor([next_position], dtype=torch.int64, device=device),
        original_length=original_length,
    )


def _layer(keys, values, positions, lengths: list[int], headroom: int, device, compute: torch.dtype) -> LayerCache:
    """Flat per-head layout with `headroom` free rows after each head's kept rows.

    keys/values [total, D] and positions [total] are already on `device` (any float
    dtype: cast to `compute` by the copies); the layout is built there, one slice copy
    per head.
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n + headroom)
    capacity = starts[-1]
    dim = keys.shape[-1]
    on_cpu = device.type == "cpu"
    # On the GPU one memset is cheapest; on the CPU only the headroom is cleared.
    make = torch.empty if on_cpu else torch.zeros
    flat_keys = make(1, capacity, dim, dtype=compute, device=device)
    flat_values = make(1, capacity, dim, dtype=compute, device=device)
    flat_positions = torch.full((1, capacity), -1, dtype=torch.int32, device=device)
    src = 0
    for start, n in zip(starts[:-1], lengths):
        if n:
            flat_keys[0, start : start + n].copy_(keys[src : src + n])
            flat_values[0, start : start + n].copy_(values[src : src + n])
            flat_positions[0, start : start + n].copy_(positions[src : src + n])
        if on_cpu and headroom:
            flat_keys[0, start + n : start + n + headroom].zero_()
            flat_values[0, start + n : start + n + headroom].zero_()
        src += n
    return LayerCache(
        keys=flat_keys,
        values=flat_values,
        positions=flat_positions,
        offsets=torch.tensor(starts, dtype=torch.int32, device=device),
        lengths=torch.tensor([lengths], dtype=torch.int32, device=device),
    )
