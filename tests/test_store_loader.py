"""The .kvc loader against hostile files (issue 14: High-2, Low-8).

Every file here is forged with valid checksums where that matters, so the loader's own
checks (not the checksum) are what must refuse it: bounded allocations, tensor tables
that tile the data exactly, header fields of the right type and range, JSON depth, and
shapes that fit the model, all as one-line KvcliErrors.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from kvcli.errors import KvcliError
from kvcli.store import kvcfile
from kvcli.store.kvcfile import load_cache, read_header, save_cache
from kvcli.store.quantize import dequantize
from tests.support import frame, join, make_cache, make_header, split

ROOT = Path(__file__).resolve().parents[1]


# ---- forging files ---------------------------------------------------------------------


def data_checksum(table: dict, body: bytes) -> str:
    """The format-2 data checksum a forger computes for `body` under `table`."""
    chunks = {}
    for name, spec in table.items():
        offsets = spec.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            chunks[name] = body[offsets[0] : offsets[1]]  # malformed entries are refused before hashing anyway
    return kvcfile._checksum_v2(chunks)


def forge_empty_heads(path: Path, *, layers: int, heads: int, head_dim: int) -> None:
    """A small, fully valid file whose every head keeps zero rows: only the header and the
    lengths tensors have bytes, so a loader that gives each head headroom of head_dim
    columns allocates layers * heads * 512 * head_dim * 8 bytes out of a few KB."""
    table, body = {}, b""
    for i in range(layers):
        lengths = struct.pack(f"<{heads}i", *([0] * heads))
        table[f"layer.{i}.lengths"] = {"dtype": "I32", "shape": [heads], "data_offsets": [len(body), len(body) + len(lengths)]}
        body += lengths
        for name, dtype, shape in (("positions", "I32", [0]), ("keys", "F32", [0, head_dim]), ("values", "F32", [0, head_dim])):
            table[f"layer.{i}.{name}"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body)]}
    header = {
        "format": "kvcli-cache", "format_version": 2, "kvcli_version": "0.1.0", "kv_dtype": "fp32", "source_dtype": "fp32",
        "head_dim": head_dim, "original_length": 0, "next_position": 0, "num_layers": layers, "quantization": None,
        "lengths": [[0] * heads for _ in range(layers)], "checksum": data_checksum(table, body),
    }
    path.write_bytes(join(table, header, body))


def reference_rows(data: bytes, dtype: torch.dtype) -> list[list[tuple[torch.Tensor, torch.Tensor, list[int]]]]:
    """Per layer, per head: (keys, values, positions) in `dtype`, decoded independently with safetensors."""
    _, header, _ = split(data)
    tensors = st_load(data)
    bits = {"int8": 8, "int4": 4}.get(header["kv_dtype"])
    out = []
    for i, lengths in enumerate(header["lengths"]):
        rows = {}
        for name in ("keys", "values"):
            base = f"layer.{i}.{name}"
            if bits is None:
                rows[name] = tensors[base].to(dtype)
            else:
                q = header["quantization"]
                rows[name] = dequantize(
                    tensors[base], tensors[base + ".scales"], tensors.get(base + ".zeros"),
                    bits=bits, group_size=q["group_size"], dim=header["head_dim"], dtype=dtype,
                )
        heads, start = [], 0
        for n in lengths:
            heads.append((rows["keys"][start : start + n], rows["values"][start : start + n], tensors[f"layer.{i}.positions"][start : start + n].tolist()))
            start += n
        out.append(heads)
    return out


def assert_loaded_as_written(data: bytes, loaded, header) -> None:
    """A load is correct when it holds exactly what the file's bytes say."""
    raw = split(data)[1]
    assert header.next_position == raw["next_position"] == int(loaded.next_position[0])
    assert loaded.original_length == raw["original_length"]
    for layer, heads in zip(loaded.layers, reference_rows(data, loaded.layers[0].keys.dtype), strict=True):
        assert layer.lengths[0].tolist() == [len(p) for _, _, p in heads]
        for h, (keys, values, positions) in enumerate(heads):
            k, v, p = layer.head_rows(0, h)
            assert p.tolist() == positions
            # exactly equal; a re-signed flipped bit may make a NaN, which must come back a NaN
            torch.testing.assert_close(k, keys, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(v, values, rtol=0, atol=0, equal_nan=True)


def one_line_error(call) -> str:
    with pytest.raises(KvcliError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message, repr(message)
    return message


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "c.kvc"
    save_cache(path, make_cache(num_layers=2, num_heads=3, tokens=12, head_dim=32), make_header())
    return path


# ---- the tensor table -------------------------------------------------------------------


def test_overlapping_tensors_are_refused(saved):
    """Two tensors sharing bytes (keys read as values) used to load."""
    table, header, body = split(saved.read_bytes())
    keys, values = table["layer.1.keys"], table["layer.1.values"]
    # values re-pointed at the keys' bytes; the freed span becomes a gap filler of the same size
    assert keys["data_offsets"][1] - keys["data_offsets"][0] == values["data_offsets"][1] - values["data_offsets"][0]
    values["data_offsets"] = list(keys["data_offsets"])
    header["checksum"] = data_checksum(table, body)
    saved.write_bytes(join(table, header, body))
    message = one_line_error(lambda: load_cache(saved))
    assert "overlaps another" in message or "leaves a gap" in message, message


def test_misaligned_tensor_is_refused(saved):
    """An int32/float32 tensor at an odd offset (safetensors never writes one) used to load
    through a copy. One pad byte in front shifts every tensor; the table still tiles."""
    table, header, body = split(saved.read_bytes())
    for spec in table.values():
        spec["data_offsets"] = [spec["data_offsets"][0] + 1, spec["data_offsets"][1] + 1]
    table["pad"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    saved.write_bytes(join(table, header, b"\0" + body))
    assert "is misaligned (offset " in one_line_error(lambda: load_cache(saved))


def test_offsets_out_of_range_or_of_the_wrong_type(saved):
    table, header, body = split(saved.read_bytes())
    for bad in ([0, 10**15], [5, 3], [-4, 0], [0.0, 4], ["0", "4"], [0], None):
        t = json.loads(json.dumps(table))
        t["layer.0.lengths"]["data_offsets"] = bad
        saved.write_bytes(join(t, header, body))
        message = one_line_error(lambda: load_cache(saved))
        assert message.startswith(f"{saved} is corrupted: tensor layer.0.lengths has bad data offsets"), message
    # 1e999 cannot come out of json.dumps: written as text, as an attacker would (OverflowError before)
    t = json.loads(json.dumps(table))
    t["layer.0.lengths"]["data_offsets"] = "@@"
    text = json.dumps({"__metadata__": {"kvcli": json.dumps({**header})}, **t}).replace('"@@"', "[0, 1e999]")
    saved.write_bytes(frame(text.encode(), body))
    assert "number 1e999 is out of range" in one_line_error(lambda: load_cache(saved))


def test_not_a_regular_file_or_not_a_path(tmp_path):
    """A FIFO named .kvc is refused without blocking; a NUL byte in a path is one line."""
    fifo = tmp_path / "pipe.kvc"
    os.mkfifo(fifo)
    assert one_line_error(lambda: load_cache(fifo)) == f"{fifo} is not a file"
    assert one_line_error(lambda: read_header(tmp_path / "a\0.kvc")).endswith("a path cannot contain a NUL byte")


# ---- header fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda h: h.pop("lengths"), "lengths is missing"),
        (lambda h: h.pop("next_position"), "next_position is missing"),
        (lambda h: h.update(head_dim="64"), "head_dim must be an integer"),
        (lambda h: h.update(head_dim=10**6), "head_dim must be an integer in [1, 4096]"),
        (lambda h: h.update(num_layers=2.0), "num_layers must be an integer"),
        (lambda h: h.update(next_position=2**40), "next_position must be an integer in [0, 2147483647]"),
        (lambda h: h.update(lengths=[[1, 2], "x"]), "lengths[1] must be a list"),
        (lambda h: h.update(lengths=[[-1, 2, 3], [1, 2, 3]]), "lengths[0] must be an integer"),
        (lambda h: h.update(kv_dtype="int3"), "unknown kv_dtype"),
        (lambda h: h.update(quantization={"bits": 8}), "quantization must be null"),
        (lambda h: h.update(checksum=None), "checksum must be a string"),
        (lambda h: h.update(model={"name": "m"}), "model.fingerprint is missing"),
        (lambda h: h.update(model="SmolLM2"), "model must be an object"),
        (lambda h: h["document"].pop("sha256"), "document.sha256 is missing"),
        (lambda h: h["document"].update(tokens=-3), "document.tokens must be an integer"),
        (lambda h: h["document"].update(pages=[[1, 2]]), "document.pages must be a list of [page, start, end]"),
        (lambda h: h["method"].update(ratio="half"), "method.ratio must be a number"),
        (lambda h: h["method"].update(ratio=7), "method.ratio must be in (0, 1]"),
        (lambda h: h.update(prefix_ids=[1, "2"]), "prefix_ids must be an integer"),
        (lambda h: h.update(stats=[1]), "stats must be an object"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_header_fields_are_one_line_errors(saved, change, expected):
    """A forged header (its checksum recomputed) with a field missing or of the wrong type:
    a KeyError / TypeError / OverflowError traceback in `info`, `ask` and `cache list` before."""
    table, header, body = split(saved.read_bytes())
    header.pop("header_checksum")
    change(header)
    saved.write_bytes(join(table, header, body))
    for read in (read_header, load_cache):
        message = one_line_error(lambda: read(saved))
        assert message.startswith(f"{saved} is corrupted: "), message
        assert expected in message, message


def test_deeply_nested_header_is_a_one_line_error(saved):
    """100,000-deep JSON used to be a RecursionError traceback."""
    table, header, body = split(saved.read_bytes())
    header.pop("header_checksum")
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(header)[:-1] + ', "stats": ' + deep + "}"
    saved.write_bytes(join(table, text, body))
    message = one_line_error(lambda: read_header(saved))
    assert "nested deeper than 32 levels" in message, message
    # and in the safetensors table itself, outside the kvcli JSON
    text = json.dumps({"__metadata__": {"kvcli": json.dumps(header)}, **table})[:-1] + ', "x": ' + deep + "}"
    saved.write_bytes(frame(text.encode(), body))
    assert "nested deeper than 32 levels" in one_line_error(lambda: load_cache(saved))


def test_hostile_strings_in_the_header_cost_linear_time(saved):
    """A header of escaped quotes: a regex pass over the text to skip strings (one way to
    cap depth) is quadratic on it; the check must not be."""
    table, header, body = split(saved.read_bytes())
    text = json.dumps({"__metadata__": {"kvcli": json.dumps(header)}, **table})[:-1] + ', "x": "' + '\\"' * 2_000_000 + "}"
    saved.write_bytes(frame(text.encode(), body))
    started = time.monotonic()
    assert "unreadable header" in one_line_error(lambda: load_cache(saved))
    assert time.monotonic() - started < 5


def test_non_finite_and_huge_numbers_in_the_header(saved):
    table, header, body = split(saved.read_bytes())
    header.pop("header_checksum")
    for literal, expected in (("1e999", "out of range"), ("NaN", "not a JSON number"), ("-Infinity", "not a JSON number"), ("1" * 400, "out of range")):
        text = json.dumps({**header, "original_length": "@@"}).replace('"@@"', literal)
        saved.write_bytes(join(table, text, body))
        message = one_line_error(lambda: load_cache(saved))
        assert expected in message, (literal, message)


# ---- shapes against the model, before any allocation -----------------------------------


def test_shape_must_match_the_model(saved):
    cache, _ = load_cache(saved, expected_shape=(2, 3, 32))
    assert len(cache.layers) == 2
    for shape in ((3, 3, 32), (2, 4, 32), (2, 3, 64)):
        message = one_line_error(lambda: load_cache(saved, expected_shape=shape))
        assert message == (
            f"{saved} holds 2 layers x 3 KV heads x head_dim 32; the current model has {shape[0]} x {shape[1]} x {shape[2]}; "
            "compress the document again for this model"
        )


def test_shape_is_checked_before_allocating(saved, monkeypatch):
    """Not even the read buffer is allocated for a cache that cannot fit the model."""
    calls = []
    real = kvcfile._build
    monkeypatch.setattr(kvcfile, "_build", lambda *a, **k: calls.append(1) or real(*a, **k))
    one_line_error(lambda: load_cache(saved, expected_shape=(2, 3, 64)))
    assert calls == []


def test_checksum_is_verified_before_the_cache_is_built(saved, monkeypatch):
    """Damaged data must never reach the flat cache (or the device): the layout builder is
    not even called. Before, every layer was built and uploaded while the hash ran."""
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0x40
    saved.write_bytes(bytes(data))
    built = []
    monkeypatch.setattr(kvcfile, "_layer", lambda *a, **k: built.append(1))
    assert one_line_error(lambda: load_cache(saved)).endswith("(checksum mismatch)")
    assert built == []


def test_empty_heads_get_bounded_headroom(tmp_path):
    """Zero-row heads used to get 512 rows each of any head_dim: headroom is capped by the
    kept rows' size or HEADROOM_FLOOR_BYTES (decoding grows it when it needs to)."""
    path = tmp_path / "empty.kvc"
    forge_empty_heads(path, layers=8, heads=64, head_dim=4096)
    assert path.stat().st_size < 20_000
    cache, _ = load_cache(path)
    allocated = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    assert allocated <= kvcfile.HEADROOM_FLOOR_BYTES
    # still a usable cache: a decoded token is appended (reserve grows what is missing)
    cache.reserve(1)
    layer = cache.layers[0]
    layer.append(torch.ones(1, 64, 1, 4096), torch.ones(1, 64, 1, 4096), torch.tensor([[0]]))
    assert layer.lengths[0].tolist() == [1] * 64
    # the default headroom is untouched where it is cheap
    small = tmp_path / "small.kvc"
    save_cache(small, make_cache(), make_header())
    loaded, _ = load_cache(small)
    assert (loaded.layers[0].capacity_per_head - loaded.layers[0].lengths[0]).tolist() == [512] * 4


ALLOCATION_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {root!r})
    import torch
    from kvcli.errors import KvcliError
    from kvcli.store.kvcfile import load_cache
    torch.set_num_threads(1)
    # Address space already mapped by Python + torch, plus the budget under test.
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = vm + {budget}
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for path, shape in {cases!r}:
        try:
            cache, _ = load_cache(path, expected_shape=shape)
            print("loaded", sum(l.keys.numel() for l in cache.layers), flush=True)
        except KvcliError as e:
            print("refused", e, flush=True)
    """
)


def test_allocation_is_bounded_under_an_address_space_limit(tmp_path):
    """The issue's attack: a ~2 KB file of empty heads that made the loader allocate 1 GB
    (32 GB in a variant). Under RLIMIT_AS of 600 MB more than an idle process, each is
    refused by its header or loads with bounded headroom; none runs out of memory."""
    huge_dim = tmp_path / "huge_dim.kvc"  # the 2,258-byte file: head_dim far beyond any model
    forge_empty_heads(huge_dim, layers=2, heads=8, head_dim=131_072)
    many_heads = tmp_path / "many_heads.kvc"  # 32 GB before: 16 layers x 64 heads x 512 x 4096 x 8
    forge_empty_heads(many_heads, layers=16, heads=64, head_dim=4096)
    sizes = huge_dim.stat().st_size, many_heads.stat().st_size
    assert max(sizes) < 40_000, sizes
    cases = [(str(huge_dim), None), (str(many_heads), None), (str(many_heads), (16, 8, 128))]
    script = ALLOCATION_SCRIPT.format(root=str(ROOT), budget=600 << 20, cases=cases)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout + result.stderr[-2000:]
    assert lines[0].startswith("refused") and "head_dim must be an integer in [1, 4096]" in lines[0], lines[0]
    assert lines[1].startswith("loaded"), lines[1]
    assert lines[2].startswith("refused") and "the current model has 16 x 8 x 128" in lines[2], lines[2]
    assert time.monotonic() - started < 60


# ---- the fuzz test ----------------------------------------------------------------------

HOSTILE_VALUES = [None, -1, 0, 1, 2**31, 2**63 - 1, 10**18, 1e308, -0.0, 0.5, "", "x" * 50, [], {}, [[]], [0], [[0]], True, {"a": 1}]


def _paths(value, prefix=()):
    """Every path into a JSON value, for picking a field to mutate."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, prefix + (i,))


def _set(root, path, value, delete=False):
    target = root
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a real file; most keep every checksum valid (a forger can)."""
    kind = rng.randrange(8)
    if kind == 0:  # flipped bits anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncated or extended
        return data[: rng.randrange(len(data))] if rng.random() < 0.7 else data + bytes(rng.randrange(1, 64))
    table, header, body = split(data)
    header.pop("header_checksum")
    if kind in (2, 3, 4):  # one header field replaced or deleted, header re-signed
        path = rng.choice([p for p in _paths(header) if p])
        _set(header, path, rng.choice(HOSTILE_VALUES), delete=kind == 4 and not isinstance(path[-1], int))
        return join(table, header, body)
    if kind == 5:  # one tensor-table entry changed, everything re-signed
        name = rng.choice(sorted(table))
        key = rng.choice(["dtype", "shape", "data_offsets"])
        value = {
            "dtype": rng.choice(["F32", "F16", "I32", "I8", "U8", "F64", "BOOL", 3]),
            "shape": rng.choice([[], [0], [2**40], [1, 1, 1, 1, 1], [rng.randrange(64), rng.randrange(64)], "x"]),
            "data_offsets": [rng.randrange(len(body) + 8) for _ in range(rng.choice([2, 2, 2, 1, 3]))],
        }[key]
        table[name][key] = value
        header["checksum"] = data_checksum(table, body)
        return join(table, header, body)
    if kind == 6:  # data changed and re-signed: a valid file that must load as written
        out = bytearray(body)
        if out:
            # only key/value bytes, so the file stays consistent (lengths/positions are checked)
            spans = [spec["data_offsets"] for name, spec in table.items() if name.endswith(("keys", "values")) and spec["data_offsets"][1] > spec["data_offsets"][0]]
            b, e = rng.choice(spans)
            out[rng.randrange(b, e)] ^= 1 << rng.randrange(7)
        header["checksum"] = data_checksum(table, bytes(out))
        return join(table, header, bytes(out))
    # kind 7: a header length prefix that lies
    (hlen,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", rng.choice([0, 1, hlen - 1, hlen + 1, hlen * 2, 2**63, len(data)])) + data[8:]


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory) -> list[bytes]:
    """Real small files written by the code: each storage dtype, and format version 1."""
    from tests.support import as_version_1

    root = tmp_path_factory.mktemp("seeds")
    files = []
    for i, (kv_dtype, dtype) in enumerate([("auto", torch.float32), ("auto", torch.float16), ("auto", torch.bfloat16), ("int8", torch.float16), ("int4", torch.float32)]):
        path = root / f"{i}.kvc"
        save_cache(path, make_cache(seed=i, num_layers=2, num_heads=2, tokens=6, head_dim=40, dtype=dtype), make_header(), kv_dtype=kv_dtype)
        files.append(path.read_bytes())
    path = root / "v1.kvc"
    path.write_bytes(files[0])
    as_version_1(path)
    files.append(path.read_bytes())
    return files


def test_fuzz_loader(tmp_path, seed_files):
    """1,500 mutations of real files (deterministic): every outcome is a one-line KvcliError
    or a load that holds exactly what the file's bytes say; never another exception."""
    rng = random.Random(14)
    path = tmp_path / "fuzz.kvc"
    outcomes = {"refused": 0, "loaded": 0}
    started = time.monotonic()
    for i in range(1500):
        data = mutate(rng.choice(seed_files), rng)
        path.write_bytes(data)
        try:
            read_header(path)
            loaded, header = load_cache(path)
        except KvcliError as e:
            message = str(e)
            assert message and "\n" not in message, (i, message)
            assert "MemoryError" not in message and "allocate" not in message, (i, message)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # the test's point: nothing else may escape
            import traceback

            pytest.fail(f"mutation {i}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        assert_loaded_as_written(data, loaded, header)
        outcomes["loaded"] += 1
    elapsed = time.monotonic() - started
    assert outcomes["refused"] > 300 and outcomes["loaded"] > 30, outcomes  # both paths exercised
    assert elapsed < 40, elapsed
