"""The .kvc file: one compressed KV cache on disk, as a plain safetensors file.

Layout (a valid safetensors file, loadable without running any code):

    layer.{i}.lengths    int32 [Hkv]          rows kept per KV head
    layer.{i}.positions  int32 [total]        original RoPE position of every kept row
    layer.{i}.keys       [total, D]           kept rows, head after head (no headroom)
    layer.{i}.values     [total, D]
    layer.{i}.scores     fp32 [total]        optional (kvcli serve): each row's selection score
  quantized (int8 / int4) instead:
    layer.{i}.keys       int8 [total, Dp] | uint8 [total, Dp/2] (int4: two codes a byte)
    layer.{i}.keys.scales fp16 [total, Dp/32]
    layer.{i}.keys.zeros  fp16 [total, Dp/32]  (int4 only: the per-group offset)
    (same for values)

The safetensors metadata holds {"kvcli": json}: the header (kvcli.store.header.KvcHeader,
the one place it is read, checked and written) = the caller's content plus the fields
this module adds (format, format_version, checksum, lengths, ...) and `header_checksum`, a
sha256 over the canonical JSON of the header itself, so any flipped byte is reported,
never loaded. `checksum` covers the bytes of every tensor:

  format_version 2 (written now): sha256 of the text  "{name}:{sha256 of its bytes}\n"
      for every tensor in sorted name order; the per-tensor hashes run in parallel
      (one thread a core: hashlib releases the GIL), overlapped with the device upload.
  format_version 1 (still read): one sha256 stream over the bytes of every tensor in
      sorted name order (single-threaded, so slower to verify).

The two schemes give different digests for the same bytes and format_version is under
`header_checksum`, so a file cannot pass one scheme's check with the other's digest.

Loading treats the file as hostile until proven otherwise, because `kvcli ask FILE.kvc`
and the server's /ask take any path: the tensor table must tile the data section exactly
(no overlap, no gap, every tensor aligned to its element size, shapes matching the
header's lengths), the header's layer / KV head / head_dim counts must match the model
when one is given, and the data checksum is verified before anything but the one read
buffer (the file's own size: on the host, or for a CUDA load on the device, filled through
a few small page-locked slots) is allocated. Only then is the flat layout built with
headroom (and int8/int4 dequantized) on the target device. Headroom is
a decoding convenience (LayerCache.reserve grows it on demand), so its allocation is
capped by the kept rows' size (or HEADROOM_FLOOR_BYTES): a file of empty heads cannot
turn a few bytes into gigabytes.

Writes are atomic: a temp file in the same directory (O_EXCL|O_NOFOLLOW, private while
written), fsync, os.replace, fsync of the directory. A crash, a Ctrl-C or a full disk
leaves the previous file untouched; a replaced file keeps its mode; temp files left by a
killed writer are swept by the next write into the directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import kvcli
from kvcli.errors import KvcliError
from kvcli.store import header as kvc_header
from kvcli.store.header import FORMAT, FORMAT_VERSION, READABLE_VERSIONS, KvcHeader

# torch is imported by the functions that move tensors, not here: reading a header
# (`kvcli info FILE.kvc`, a bad file refused before the model loads) needs none of it.
if TYPE_CHECKING:
    import torch

    from kvcli.cache import CompressedCache, LayerCache

__all__ = [
    "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "GROUP_SIZE", "KV_DTYPES", "KvcHeader",
    "atomic_write", "save_cache", "read_header", "load_cache", "sweep_stale_temps",
]

METADATA_KEY = "kvcli"
# Values per quantization group along head_dim: divides every common head_dim (64, 96,
# 128, 256; others are zero-padded), keeps the fp16 scale overhead at 0.5 bit per value
# (int4 with its offset: 1 bit), and confines an outlier channel to its 32 neighbours.
# Same choice as llama.cpp's Q8_0/Q4_1 blocks.
GROUP_SIZE = 32
# Our safetensors headers are a few KB (the tensor table plus the kvcli JSON: lengths,
# prefix ids, one span per page); 16 MiB holds a document of ~500,000 pages and bounds
# the JSON parse (and its depth check) of a hostile file.
MAX_HEADER_BYTES = 16 << 20
WRITE_CHUNK = 8 << 20
# Reads are cut into pieces of this size so every core has some to do.
READ_CHUNK = 16 << 20
# Headroom may take up to the kept rows' own size, or this much when they are smaller:
# 64 MiB is the default 512 rows for an 8B-shaped cache (32 layers x 8 heads x 128 x bf16),
# and a longer conversation grows it (LayerCache.reserve) exactly as it would anyway.
HEADROOM_FLOOR_BYTES = 64 << 20
# A killed writer's temp file is swept once its process is gone and it has not been
# written for this long: a writer on another host sharing the directory (its pid means
# nothing here) keeps touching its file while it writes.
STALE_TEMP_SECONDS = 60.0

_FLOAT_KV = ("fp32", "fp16", "bf16")
_BITS = kvc_header.QUANT_BITS
KV_DTYPES = ("auto", *_FLOAT_KV, *_BITS)
# safetensors dtype codes we accept, and their element sizes.
_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}
_TEMP_NAME = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]{12}")


# --------------------------------------------------------------------------- helpers


def is_cache_file(source: str) -> bool:
    """Whether a document argument names a saved cache (by its suffix, as the CLI documents)."""
    return source.endswith(".kvc")


@cache
def _dtypes() -> dict:
    """The float kv dtype names -> torch dtypes."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@cache
def _dtype_names() -> dict:
    return {v: k for k, v in _dtypes().items()}


@cache
def _st_torch() -> dict:
    """safetensors dtype codes -> torch dtypes."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, as safetensors writes them."""
    import torch

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


def _used_rows(layer: LayerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

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


# --------------------------------------------------------------------------- atomic writes


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


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def sweep_stale_temps(directory: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS) -> list[str]:
    """Remove the temp files (`.NAME.tmp-PID-HEX`) of writers killed mid-write.

    Only our own files, whose writer's pid no longer runs and that were last written more
    than `older_than` seconds ago; never a file under its final name (nothing loads a temp
    file, so removing one loses nothing). Returns the names removed.
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if not match:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if (
                stat.S_ISREG(info.st_mode)
                and info.st_uid == os.geteuid()
                and now - info.st_mtime > older_than
                and not pid_alive(int(match.group(1)))
            ):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` via a same-directory temp file, fsync, os.replace and a directory
    fsync: a crash, Ctrl-C or full disk leaves the old file or the new one, never a mix.

    The file's mode: an existing regular file's own (a 0600 file stays 0600); else `mode`
    (the store passes 0600); else the user's umask default, as `open` would give. The temp
    file is created O_EXCL|O_NOFOLLOW (a planted link is never written through) and is
    private until it gets its final mode. Stale temp files of killed writers in the same
    directory are swept first. Failures are one-line KvcliErrors naming the path.
    """
    path = Path(path)
    directory = path.parent
    sweep_stale_temps(directory)
    try:
        existing = os.lstat(path)
        keep = stat.S_IMODE(existing.st_mode) if stat.S_ISREG(existing.st_mode) else mode
    except OSError:
        keep = mode
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600 if keep is not None else 0o666)
    except OSError as e:
        raise _write_error(path, e, len(data)) from e
    try:
        with os.fdopen(fd, "wb") as fileobj:
            _write_chunks(fileobj, data)
            fileobj.flush()
            if keep is not None:
                os.fchmod(fileobj.fileno(), keep)
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


def save_cache(
    path: str | os.PathLike, cache: CompressedCache, header: dict, *, kv_dtype: str = "auto", mode: int | None = None,
    scores: bool = False,
) -> int:
    """Write batch row 0 of `cache` (only the rows in use) to `path` as a .kvc file.

    kv_dtype: "auto" (the cache's dtype), "bf16", "fp16", "fp32" (cast), or "int8" /
    "int4" (lossy, per group of 32 along head_dim, see kvcli.store.quantize). `header` is
    the caller's content (model, document, method, ... or any JSON object), checked by
    KvcHeader together with the fields this module adds (which win on a clash). mode: the
    new file's mode (see atomic_write). scores: also write the cache's per-row selection
    scores (`cache.scores`, when it has them and they match the rows in use) as
    layer.{i}.scores, F32 [rows], described by the header's `scores` (kvcli serve does, so a
    cache on disk can be compressed further without reading the document again; a kvcli
    older than that refuses such a file). Returns the number of bytes written. Atomic.
    """
    import torch

    from kvcli.store.quantize import quantize

    path = Path(path)
    if kv_dtype not in KV_DTYPES:
        raise KvcliError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if cache.batch_size != 1 or any(layer.keys.shape[0] != 1 for layer in cache.layers):
        raise KvcliError(f"cannot save {path}: only a single-sequence cache can be saved (batch size {cache.batch_size})")
    if not cache.layers:
        raise KvcliError(f"cannot save {path}: the cache has no layers")
    source_dtype = cache.layers[0].keys.dtype
    if source_dtype not in _dtype_names():
        raise KvcliError(f"cannot save {path}: unsupported cache dtype {source_dtype}")
    if kv_dtype == "auto":
        kv_dtype = _dtype_names()[source_dtype]
    bits = _BITS.get(kv_dtype)
    head_dim = int(cache.layers[0].keys.shape[-1])

    tensors: dict[str, torch.Tensor] = {}
    lengths_all: list[list[int]] = []
    row_scores = cache.scores if scores else None
    if row_scores is not None and (
        len(row_scores) != len(cache.layers)
        or any(s.numel() != int(layer.lengths[0].sum()) for s, layer in zip(row_scores, cache.layers))
    ):
        row_scores = None  # rows appended since they were scored (decoding): none are written
    for i, layer in enumerate(cache.layers):
        keys, values, positions, lengths = _used_rows(layer)
        if keys.shape[-1] != head_dim:
            raise KvcliError(f"cannot save {path}: layer {i} has head_dim {keys.shape[-1]}, layer 0 has {head_dim}")
        tensors[f"layer.{i}.lengths"] = lengths.contiguous()
        tensors[f"layer.{i}.positions"] = positions.contiguous()
        lengths_all.append([int(n) for n in lengths])
        if row_scores is not None:
            tensors[f"layer.{i}.scores"] = row_scores[i].detach().to("cpu", torch.float32).reshape(-1).contiguous()
        for name, rows in (("keys", keys), ("values", values)):
            if bits is None:
                tensors[f"layer.{i}.{name}"] = rows.to(_dtypes()[kv_dtype]).contiguous()
                continue
            try:
                parts = quantize(rows, bits, GROUP_SIZE)
            except ValueError as e:
                raise KvcliError(f"cannot save {path} as {kv_dtype}: {e}; use --kv-dtype fp16 or bf16") from e
            tensors[f"layer.{i}.{name}"] = parts[0].contiguous()
            tensors[f"layer.{i}.{name}.scales"] = parts[1].contiguous()
            if bits == 4:
                tensors[f"layer.{i}.{name}.zeros"] = parts[2].contiguous()

    full = KvcHeader.for_cache(
        header,
        kvcli_version=kvcli.__version__,
        kv_dtype=kv_dtype,
        source_dtype=_dtype_names()[source_dtype],
        head_dim=head_dim,
        original_length=int(cache.original_length),
        next_position=int(cache.next_position.reshape(-1)[0]),
        num_layers=len(cache.layers),
        quantization=None if bits is None else {"bits": bits, "group_size": GROUP_SIZE, "scheme": "symmetric" if bits == 8 else "asymmetric"},
        lengths=lengths_all,
        checksum=_checksum({name: _tensor_bytes(t) for name, t in tensors.items()}),
        scores=None if row_scores is None else {"dtype": "fp32"},
    )

    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={METADATA_KEY: full.to_json()})
    atomic_write(path, data, mode=mode)
    return len(data)


# --------------------------------------------------------------------------- load


def _open(path: Path):
    """Open for reading without blocking (a FIFO named .kvc must not hang us) and check,
    on the open file itself, that it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KvcliError(f"{path} does not exist") from None
    except OSError as e:
        raise KvcliError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the path (the server gets paths as JSON)
        raise KvcliError(f"cannot read {str(path)!r}: a path cannot contain a NUL byte") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KvcliError(f"{path} is not a file")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


class _Tensor:
    """One entry of the tensor table, checked: dtype code, shape, [begin, end) in the data."""

    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: list[int], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _tensor_table(path: Path, table: dict) -> tuple[dict[str, _Tensor], int]:
    """Check the safetensors tensor table; returns it typed and the data section's length.

    What the safetensors format promises and a hostile file may break: every entry a known
    dtype, a small shape and integer offsets whose span is exactly the shape's bytes;
    every tensor aligned to its element size; together the tensors tile [0, end) with no
    overlap and no gap (so no byte is read twice as two different tensors).
    """

    def corrupt(reason: str) -> KvcliError:
        return KvcliError(f"{path} is corrupted: {reason}")

    tensors: dict[str, _Tensor] = {}
    for name, spec in table.items():
        shown = _shown(name)
        if not isinstance(spec, dict):
            raise corrupt(f"bad tensor table entry {shown}")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_SIZES:  # a list would not even hash
            raise corrupt(f"tensor {shown} has unsupported dtype {kvc_header._show(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= 4 and all(type(s) is int and s >= 0 for s in shape)):
            raise corrupt(f"tensor {shown} has a bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {shown} has bad data offsets")
        numel = 1
        for s in shape:
            numel *= s
        size = _ST_SIZES[dtype]
        if offsets[1] - offsets[0] != numel * size:
            raise corrupt(f"tensor {shown} has bad data offsets (its span is not its shape's size)")
        if offsets[0] % size:
            raise corrupt(f"tensor {shown} is misaligned (offset {offsets[0]} for {size}-byte elements)")
        tensors[name] = _Tensor(dtype, shape, offsets[0], offsets[1])
    end = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != end:
            shown = _shown(name)
            raise corrupt(f"tensor {shown} {'overlaps another' if t.begin < end else 'leaves a gap before it'} (offset {t.begin})")
        end = t.end
    return tensors, end


def _shown(name: str) -> str:
    """A tensor name from the file, safe inside a one-line message."""
    return name if name.isprintable() and len(name) <= 80 else repr(name[:80])


def _parse(path: Path, f) -> tuple[KvcHeader, dict[str, _Tensor], int, int]:
    """Validate the framing, tensor table and kvcli header of the open file `f`.

    Returns (header, tensor table, data start, data length). Only the header is read;
    the tensors are read later from the same open file.
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
        table = kvc_header.loads(raw.decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("the safetensors header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        if looks_ours:
            raise KvcliError(f"{path} is corrupted: unreadable header ({kvc_header._brief(e)})") from None
        raise KvcliError(f"{path} is not a kvcli cache file") from None
    meta = table.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        if looks_ours:
            raise KvcliError(f"{path} is corrupted: no kvcli header")
        raise KvcliError(f"{path} is not a kvcli cache file")
    tensors, end = _tensor_table(path, table)
    expected = 8 + header_len + end
    if size < expected:
        raise KvcliError(f"{path} is truncated: {size} bytes, expected {expected}")
    if size > expected:
        raise KvcliError(f"{path} is corrupted: {size} bytes, expected {expected} ({size - expected} trailing bytes)")
    header = KvcHeader.parse(meta[METADATA_KEY], str(path))
    return header, tensors, 8 + header_len, end


def _read_exactly(f, n: int) -> bytes:
    parts = []
    while n > 0:
        part = f.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _check_model(path: Path, header: KvcHeader, expected_model: str | None, expected_name: str | None) -> None:
    if expected_model is None:
        return
    found = header.model.fingerprint if header.model else ""
    if found == expected_model:
        return
    name = header.model.name if header.model else "an unknown model"
    current = f"is {expected_name} ({expected_model[:12]}…)" if expected_name else f"has fingerprint {expected_model[:12]}…"
    raise KvcliError(f"{path} was made by model {name} (fingerprint {found[:12] or '?'}…); the current model {current}")


def _check_shape(path: Path, header: KvcHeader, expected: tuple[int, int, int] | None) -> None:
    """The cache must fit the model before anything is allocated (else it fails mid-answer)."""
    if expected is None:
        return
    layers, heads, head_dim = expected
    heads_found = sorted({len(layer) for layer in header.lengths})
    if header.num_layers != layers or heads_found != [heads] or header.head_dim != head_dim:
        shown = "/".join(map(str, heads_found))
        raise KvcliError(
            f"{path} holds {header.num_layers} layers x {shown} KV heads x head_dim {header.head_dim}; "
            f"the current model has {layers} x {heads} x {head_dim}; compress the document again for this model"
        )


def read_header(path: str | os.PathLike) -> KvcHeader:
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
    expected_shape: tuple[int, int, int] | None = None,
    accept: Callable[[KvcHeader], None] | None = None,
    headroom: int | None = None,
    pin_memory: bool | None = None,
    scores: bool = False,
) -> tuple[CompressedCache, KvcHeader]:
    """Read a .kvc file back into a single-sequence CompressedCache with fresh headroom.

    dtype: the compute dtype of the returned keys/values (torch dtype or "fp16"/"bf16"/
    "fp32"); default: the stored dtype, or for int8/int4 files the dtype the cache had
    when it was saved (`source_dtype`). expected_model: the current model's fingerprint;
    a file made by another model is refused (expected_model_name only improves the message).
    expected_shape: the model's (layers, KV heads, head_dim), checked before any allocation.
    accept: the caller's own check of the header (raise KvcliError to refuse), run on the
    same open file as the tensors, before any allocation.
    headroom: free rows per head (default kvcli.cache.DEFAULT_HEADROOM; capped, see
    HEADROOM_FLOOR_BYTES; decoding grows it).
    pin_memory: a CUDA load streams through page-locked slots (see STAGING_BYTES) unless
    this is False (then: one pageable host buffer, copied up).
    scores: also return the file's per-row selection scores as `cache.scores` (per layer a
    float32 CPU tensor), when it holds them (kvcli serve's files do); verified with the rest.
    Every failure is a one-line KvcliError.
    """
    from kvcli.cache import DEFAULT_HEADROOM

    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    path = Path(path)
    with _open(path) as f:
        header, tensors, data_start, data_len = _parse(path, f)
        _check_model(path, header, expected_model, expected_model_name)
        _check_shape(path, header, expected_shape)
        if accept is not None:
            accept(header)
        try:
            return _build(path, header, tensors, f, data_start, data_len, device, dtype, headroom, pin_memory, scores), header
        except KvcliError:
            raise
        except Exception as e:  # anything structural we did not foresee: never a traceback
            raise KvcliError(f"{path} is corrupted: {type(e).__name__}: {kvc_header._brief(e)}") from None


def _resolve_dtype(path: Path, dtype, header: KvcHeader) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype
    if name is None:
        name = header.source_dtype if header.kv_dtype in _BITS else header.kv_dtype
    if name not in _FLOAT_KV:
        raise KvcliError(f"{path}: unknown dtype {name!r}")
    return _dtypes()[name]


def _headroom_rows(header: KvcHeader, compute: torch.dtype, requested: int) -> int:
    """Free rows per head, so that headroom costs at most max(kept rows, the floor) bytes."""
    import torch

    heads = sum(len(layer) for layer in header.lengths)
    row_bytes = heads * header.head_dim * 2 * torch.empty(0, dtype=compute).element_size()  # keys + values
    kept = sum(sum(layer) for layer in header.lengths)
    budget = max(kept * row_bytes // heads, HEADROOM_FLOOR_BYTES)
    return max(0, min(int(requested), budget // row_bytes))


# A CUDA load streams the file through page-locked slots carved from one small block:
# each worker reads a piece into a free slot, hashes it and queues its upload, and reuses
# the slot once that upload is done, so disk reads, hashing and PCIe copies overlap and
# only STAGING_BYTES are ever page-locked. (Page-locking the whole file, as before, cost
# ~0.5 s per 0.8 GiB in a fresh process: more than the rest of the load; BENCHMARKS.md.)
# Two slots a worker: one filling while the other uploads.
STAGING_BYTES = 64 << 20
STAGING_SLOT_MIN = 1 << 20


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


def _streams(device, pin_memory: bool | None, header: KvcHeader) -> bool:
    """Whether this load streams through page-locked slots (CUDA, unless pin_memory=False).

    Format 1's checksum is one sha256 over every tensor in name order, which cannot be
    computed piecewise in parallel: those files take the host-buffer path.
    """
    return device.type == "cuda" and pin_memory is not False and header.format_version != 1


def _read_to_host(path, fd, tensors, layer_names, data_start, data_len, device, version) -> tuple[torch.Tensor, str]:
    """The data section in one pageable host buffer, read by parallel preads, and its checksum."""
    import torch

    buf = torch.empty(data_len, dtype=torch.uint8)
    raw = memoryview(buf.numpy()) if data_len else memoryview(bytearray())
    chunks = {name: raw[t.begin : t.end] for name, t in tensors.items()}
    pool = ThreadPoolExecutor(max_workers=_threads())
    try:
        # Workers take tasks in order, so a hash task never waits on a read not yet taken.
        reads: dict[str, list] = {}
        hashes: dict[str, object] = {}
        for names in layer_names:
            for name in names:
                t = tensors[name]
                reads[name] = [
                    pool.submit(_pread_into, path, fd, raw, data_start, a, min(a + READ_CHUNK, t.end))
                    for a in range(t.begin, t.end, READ_CHUNK)
                ]
                if version != 1:
                    hashes[name] = pool.submit(_hash_after, reads[name], chunks[name])
        _wait(r for rs in reads.values() for r in rs)
        if version == 1:
            return buf, _checksum_v1(chunks)
        return buf, _combine_digests({name: future.result() for name, future in hashes.items()})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Slot:
    """One page-locked piece of the staging block, with the stream its uploads run on.

    (Off CUDA, which only the tests use, the block is pageable and the copy synchronous.)
    """

    def __init__(self, host: torch.Tensor, device):
        import torch

        self.host = host
        self.view = memoryview(host.numpy())
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.uploaded = torch.cuda.Event() if cuda else None

    def wait(self) -> None:
        """Until this slot's last upload has read it."""
        if self.uploaded is not None:
            self.uploaded.synchronize()

    def upload(self, dst: torch.Tensor, n: int) -> None:
        import torch

        if self.stream is None:
            dst.copy_(self.host[:n])
            return
        with torch.cuda.stream(self.stream):
            dst.copy_(self.host[:n], non_blocking=True)
            self.uploaded.record(self.stream)


def _stream_to_device(path, fd, tensors, layer_names, data_start, data_len, device, version) -> tuple[torch.Tensor, str]:
    """The data section in one device buffer, streamed through page-locked slots, and its checksum.

    A worker takes one tensor at a time and walks it in slot-sized pieces: wait until the
    slot's previous upload is done, read the piece into it, hash it (a tensor's pieces in
    order, so one sha256 per tensor as format 2 defines), queue its upload on the slot's
    stream. Reads and hashes release the GIL; the caller's stream waits for every upload.
    """
    import queue

    import torch

    workers = min(_threads(), max(1, len(tensors)))
    try:
        kept = _take_staging(device)
    except RuntimeError:  # page-locked memory refused (a container's limit): the pageable path
        return _read_to_host(path, fd, tensors, layer_names, data_start, data_len, device, version)
    slot_bytes = kept[0].host.numel()
    slots = kept[: min(2 * workers, max(1, -(-data_len // slot_bytes)))]
    buf = torch.empty(data_len, dtype=torch.uint8, device=device)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)

    def stream_tensor(t: _Tensor) -> str:
        digest = hashlib.sha256()
        for a in range(t.begin, t.end, slot_bytes):
            n = min(slot_bytes, t.end - a)
            slot = free.get()
            try:
                slot.wait()
                _pread_into(path, fd, slot.view, data_start + a, 0, n)
                digest.update(slot.view[:n])
                slot.upload(buf[a : a + n], n)
            finally:
                free.put(slot)
        return digest.hexdigest()

    names = [name for group in layer_names for name in group]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {name: pool.submit(stream_tensor, tensors[name]) for name in names}
        digests = {name: future.result() for name, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed read stops the rest
        if device.type == "cuda":
            current = torch.cuda.current_stream(device)
            for slot in slots:
                current.wait_stream(slot.stream)  # later work on `buf` runs after every upload
        _keep_staging(device, kept)  # the next load waits on each slot's last upload before reusing it
    return buf, _combine_digests(digests)


# The staging block and its slots (streams and events included) are kept for the process:
# page-locking 64 MiB cost a first load 0.04-0.05 s on the H200 machine (BENCHMARKS.md), and
# every load made its streams and events again. One set per device and size; a load that
# finds it taken (concurrent loads in the server) makes its own, let go afterwards.
_kept_staging: dict[tuple[str, int, int], list[_Slot]] = {}
_kept_staging_lock = threading.Lock()


def prepare_staging(device) -> None:
    """Page-lock the staging block and create its streams now, so that the process's first
    .kvc load does not pay for them (the CLI calls it when it loads a model on a GPU, the
    server when it starts on one)."""
    import torch

    device = torch.device(device)
    _keep_staging(device, _take_staging(device))


def _staging_shape() -> tuple[int, int]:
    """(slots, bytes a slot): two slots a worker, STAGING_BYTES in all."""
    count = 2 * _threads()
    return count, max(STAGING_SLOT_MIN, STAGING_BYTES // count)


def _take_staging(device) -> list[_Slot]:
    """The kept slots of `device` of the current shape, or new ones."""
    import torch

    count, slot_bytes = _staging_shape()
    with _kept_staging_lock:
        kept = _kept_staging.pop((str(device), count, slot_bytes), None)
    if kept is not None:
        return kept
    block = torch.empty(count * slot_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return [_Slot(block[k * slot_bytes : (k + 1) * slot_bytes], device) for k in range(count)]


def _keep_staging(device, slots: list[_Slot]) -> None:
    with _kept_staging_lock:
        _kept_staging.setdefault((str(device), len(slots), slots[0].host.numel()), slots)


def _expected_tensors(path: Path, header: KvcHeader) -> tuple[dict[str, tuple[str, list[int]]], list[list[str]]]:
    """The exact tensor table the header implies: name -> (dtype code, shape), and per layer its names."""
    bits = header.bits
    group = header.quantization.group_size if header.quantization else 0
    padded = -(-header.head_dim // group) * group if group else 0
    expected: dict[str, tuple[str, list[int]]] = {}
    layer_names: list[list[str]] = []
    for i, lengths in enumerate(header.lengths):
        total = sum(lengths)
        names = [f"layer.{i}.lengths", f"layer.{i}.positions"]
        expected[names[0]] = ("I32", [len(lengths)])
        expected[names[1]] = ("I32", [total])
        for name in ("keys", "values"):
            if bits is None:
                expected[f"layer.{i}.{name}"] = ({"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[header.kv_dtype], [total, header.head_dim])
                names.append(f"layer.{i}.{name}")
            else:
                width = padded if bits == 8 else padded // 2
                expected[f"layer.{i}.{name}"] = ("I8" if bits == 8 else "U8", [total, width])
                expected[f"layer.{i}.{name}.scales"] = ("F16", [total, padded // group])
                names += [f"layer.{i}.{name}", f"layer.{i}.{name}.scales"]
                if bits == 4:
                    expected[f"layer.{i}.{name}.zeros"] = ("F16", [total, padded // group])
                    names.append(f"layer.{i}.{name}.zeros")
        if header.scores is not None:  # optional (kvcli serve's files): F32, one per row
            expected[f"layer.{i}.scores"] = ("F32", [total])
            names.append(f"layer.{i}.scores")
        layer_names.append(names)
    return expected, layer_names


def _build(path, header: KvcHeader, tensors: dict[str, _Tensor], f, data_start, data_len, device, dtype, headroom, pin_memory,
           scores: bool = False) -> CompressedCache:
    import torch

    from kvcli.cache import CompressedCache
    from kvcli.store.quantize import dequantize

    def corrupt(reason: str) -> KvcliError:
        return KvcliError(f"{path} is corrupted: {reason}")

    bits = header.bits
    group = header.quantization.group_size if header.quantization else 0
    compute = _resolve_dtype(path, dtype, header)
    device = torch.device(device)

    # The exact tensor table we expect, checked before touching the data: with it, every
    # row count in the header is backed by bytes of the file.
    expected, layer_names = _expected_tensors(path, header)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise corrupt(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise corrupt(f"unexpected tensor {_shown(extra[0])}")
    for name, (st_dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != st_dtype or t.shape != shape:
            raise corrupt(f"tensor {name} is {t.dtype} {t.shape}, expected {st_dtype} {shape}")

    # One buffer for the data section (the file's own size), filled by parallel preads of
    # the one open file and hashed as its pieces arrive; nothing else is allocated, on the
    # host or the device, until every byte is verified. For a CUDA load that buffer is on
    # the device, filled through the staging slots.
    streamed = _streams(device, pin_memory, header)
    read = _stream_to_device if streamed else _read_to_host
    buf, digest = read(path, f.fileno(), tensors, layer_names, data_start, data_len, device, header.format_version)
    if digest != header.checksum:
        raise KvcliError(f"{path} is corrupted (checksum mismatch)")

    def tensor(name: str) -> torch.Tensor:
        t = tensors[name]
        return buf[t.begin : t.end].view(_st_torch()[t.dtype]).view(t.shape)  # aligned: checked in _tensor_table

    def upload(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)  # a no-op when streamed (already there) or loading to the CPU

    # One transfer for every layer's stored lengths (from the device, one synchronisation).
    stored = torch.cat([tensor(f"layer.{i}.lengths") for i in range(len(layer_names))]).tolist() if layer_names else []
    rows_free = _headroom_rows(header, compute, headroom)
    layers: list[LayerCache] = []
    for i, (names, lengths) in enumerate(zip(layer_names, header.lengths)):
        if stored[: len(lengths)] != list(lengths):
            raise corrupt(f"layer {i} lengths disagree with the header")
        stored = stored[len(lengths) :]
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
                    dim=header.head_dim,
                    dtype=compute,
                )
        positions = upload(tensor(f"layer.{i}.positions"))
        layers.append(_layer(rows["keys"], rows["values"], positions, list(lengths), rows_free, device, compute))
    row_scores = None
    if scores and header.scores is not None:
        row_scores = [tensor(f"layer.{i}.scores").to("cpu", copy=True) for i in range(len(layer_names))]
        if any(bool(s.isnan().any()) for s in row_scores):
            row_scores = None  # not a ranking: whoever asked reads the document again
    return CompressedCache(
        layers=layers,
        next_position=torch.tensor([header.next_position], dtype=torch.int64, device=device),
        original_length=header.original_length,
        scores=row_scores,
    )


def _layer(keys, values, positions, lengths: list[int], headroom: int, device, compute: torch.dtype) -> LayerCache:
    """Flat per-head layout with `headroom` free rows after each head's kept rows.

    keys/values [total, D] and positions [total] are already on `device` (any float
    dtype: cast to `compute` by the copies); the layout is built there, one slice copy
    per head.
    """
    import torch

    from kvcli.cache import LayerCache

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
