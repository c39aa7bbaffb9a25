"""How fast a saved .kvc file loads back: `read_header` and `load_cache` on a synthetic cache.

The cache has the shape of a Llama-3.1-8B cache by default: 32 layers x 8 KV heads x 128
dims, 32768 document tokens with 20% kept, the kept count of each head drawn from a
lognormal (heads keep very different numbers of rows, as Ada-KV/KVzip give them), bf16.
That is a ~0.8 GiB file. Values are random: load speed does not depend on them.

Timings are the minimum of --repeats runs after one warm-up, so the file is in the page
cache (what a reuse right after a save, or a second question, sees). GB/s = file bytes / s.
--first also times the first load of a fresh process (a child that has only initialised
CUDA): what `kvcli ask doc.kvc` pays, page-locking of its staging memory included.

    python -m kvcli.benchmarks.load_speed                        # CPU, default shape
    python -m kvcli.benchmarks.load_speed --device cuda          # load to the GPU as bf16
    python -m kvcli.benchmarks.load_speed --layers 8 --tokens 16384 --kv-dtype int8
    python -m kvcli.benchmarks.load_speed --device cuda --first --staging-mib 16,64,256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from kvcli.cache import CompressedCache, LayerCache
from kvcli.store import kvcfile
from kvcli.store.kvcfile import load_cache, read_header, save_cache

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synthetic_cache(
    layers: int, heads: int, head_dim: int, tokens: int, ratio: float, sigma: float, dtype: torch.dtype, seed: int = 0
) -> CompressedCache:
    """A single-sequence cache, flat layout, lognormal kept rows per head (mean tokens * ratio)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    mean = max(1.0, tokens * ratio)
    for _ in range(layers):
        raw = torch.exp(torch.randn(heads, generator=gen, dtype=torch.float64) * sigma)
        counts = (raw / raw.mean() * mean).round().clamp(1, tokens).long()
        offsets = torch.zeros(heads + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)  # no headroom needed: only rows in use are saved
        capacity = int(offsets[-1])
        keys = torch.randn(1, capacity, head_dim, generator=gen).to(dtype)
        values = torch.randn(1, capacity, head_dim, generator=gen).to(dtype)
        positions = torch.cat([torch.randperm(tokens, generator=gen)[: int(n)].sort().values for n in counts])
        out.append(
            LayerCache(
                keys=keys,
                values=values,
                positions=positions.to(torch.int32).unsqueeze(0),
                offsets=offsets.to(torch.int32),
                lengths=counts.to(torch.int32).unsqueeze(0),
            )
        )
    return CompressedCache(out, torch.tensor([tokens]), original_length=tokens)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up: page cache, CUDA context, allocator
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        del result
    return best


def first_load(path: str, device: str, dtype: str, pin: bool, staging_mib: int) -> dict:
    """The first and second load of a fresh process (run as a child; CUDA initialised first)."""
    command = [sys.executable, "-m", "kvcli.benchmarks.load_speed", "--child", path, "--device", device,
               "--dtype", dtype, "--staging-mib", str(staging_mib)] + (["--pin"] if pin else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(path: str, device: str, dtype: torch.dtype, pin: bool) -> None:
    if device.startswith("cuda"):
        torch.empty(1, device=device)  # the CUDA context, as a loaded model has it
    row = {}
    for which in ("first", "second"):
        start = time.perf_counter()
        cache, _ = load_cache(path, device=device, dtype=dtype, pin_memory=pin)
        _sync(device)
        row[f"{which}_s"] = time.perf_counter() - start
        del cache
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8, help="KV heads per layer")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32768, help="document tokens before compression")
    parser.add_argument("--ratio", type=float, default=0.2, help="mean fraction of tokens kept per head")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal spread of the per-head kept counts")
    parser.add_argument("--cache-dtype", choices=list(_DTYPES), default="bf16", help="dtype of the synthetic cache")
    parser.add_argument("--kv-dtype", default="auto", help="stored dtype: auto, bf16, fp16, fp32, int8, int4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="bf16", help="compute dtype of the loaded cache")
    parser.add_argument("--pin", action="store_true", help="stream through page-locked slots to the GPU (else one pageable buffer)")
    parser.add_argument("--staging-mib", default=str(kvcfile.STAGING_BYTES >> 20), help="page-locked staging sizes to try, comma-separated")
    parser.add_argument("--first", action="store_true", help="also time the first load of a fresh process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    stagings = [int(x) for x in args.staging_mib.split(",")]
    if args.child:
        kvcfile.STAGING_BYTES = stagings[0] << 20
        return child(args.child, args.device, _DTYPES[args.dtype], args.pin)

    built = time.perf_counter()
    cache = synthetic_cache(args.layers, args.heads, args.head_dim, args.tokens, args.ratio, args.sigma, _DTYPES[args.cache_dtype])
    built = time.perf_counter() - built
    kept = int(cache.kept_per_head().sum())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "bench.kvc")
        save_s = time.perf_counter()
        size = save_cache(path, cache, {"benchmark": "load_speed"}, kv_dtype=args.kv_dtype)
        save_s = time.perf_counter() - save_s
        del cache
        header = read_header(path)
        header_s = best_of(lambda: read_header(path), max(args.repeats, 10))
        dtype = _DTYPES[args.dtype]
        loads = {}
        for mib in stagings:
            kvcfile.STAGING_BYTES = mib << 20
            load_s = best_of(lambda: load_cache(path, device=args.device, dtype=dtype, pin_memory=args.pin), args.repeats, args.device)
            loads[mib] = {"warm_s": load_s, "warm_gb_s": size / load_s / 1e9}
            if args.first:
                loads[mib].update(first_load(path, args.device, args.dtype, args.pin, mib))
    result = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "format_version": header.format_version,
        "shape": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "tokens": args.tokens, "ratio": args.ratio},
        "kv_dtype": header.kv_dtype,
        "pinned": args.pin,
        "kept_rows": kept,
        "file_gib": size / 2**30,
        "build_s": built,
        "save_s": save_s,
        "read_header_ms": header_s * 1e3,
        "loads_by_staging_mib": loads,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
