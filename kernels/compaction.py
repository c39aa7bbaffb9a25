"""Compaction: gather every KV head's kept rows into kvcli's flat variable-length layout.

After SnapKV / Ada-KV / KVzip pick which tokens each KV head keeps (a different number
per head), the kept rows are gathered into one buffer per layer, heads back to back, each
segment followed by `headroom` free rows for decoded tokens (`kvcli.cache.LayerCache`):

    src_keys, src_values [Hkv, T, D]
    kept                 per head a sorted int64 index tensor, or (kept_index [total], counts [Hkv])
    keys, values         [1, C, D]   C = sum(counts) + Hkv * headroom; headroom rows are 0
    offsets              [Hkv + 1] int32   segment h = rows offsets[h] : offsets[h + 1]
    lengths              [1, Hkv]  int32   = counts

One launch, one program per block of *output* rows (headroom included, so no separate
memset): each output row finds its head by comparing against the offsets, its rank in
the head's segment, and, if it is a kept row, its source token from kept_index. A pure
bandwidth kernel: reads the kept rows once, writes the whole buffer once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------- reference


def _normalise_kept(kept, num_heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept_index [total] int64 on device, counts [Hkv] int64 on the host)."""
    if isinstance(kept, tuple):  # (kept_index [total], counts [Hkv]); a *list* is per head
        kept_index, counts = kept
        counts = torch.as_tensor(counts).reshape(-1)
        assert counts.numel() == num_heads, f"counts has {counts.numel()} entries for {num_heads} heads"
    elif isinstance(kept, list):
        assert len(kept) == num_heads, f"kept has {len(kept)} entries for {num_heads} heads"
        counts = torch.tensor([int(k.numel()) for k in kept], dtype=torch.int64)
        kept_index = torch.cat([k.reshape(-1).to(device=device, dtype=torch.int64) for k in kept])
    else:
        raise TypeError("kept: a list of per-head index tensors, or a tuple (kept_index [total], counts [Hkv])")
    return kept_index.to(device=device, dtype=torch.int64).contiguous(), counts.cpu().to(torch.int64)


def _layout(counts: torch.Tensor, headroom: int) -> torch.Tensor:
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts + headroom, 0)
    return offsets


def compact_reference(src_keys, src_values, kept, headroom: int):
    """Plain torch indexing, one head at a time."""
    num_heads, _, head_dim = src_keys.shape
    kept_index, counts = _normalise_kept(kept, num_heads, src_keys.device)
    offsets = _layout(counts, headroom)
    capacity = int(offsets[-1])
    keys = src_keys.new_zeros(1, capacity, head_dim)
    values = src_values.new_zeros(1, capacity, head_dim)
    first = 0
    for h in range(num_heads):
        idx = kept_index[first : first + int(counts[h])]
        first += int(counts[h])
        keys[0, int(offsets[h]) : int(offsets[h]) + idx.numel()] = src_keys[h, idx]
        values[0, int(offsets[h]) : int(offsets[h]) + idx.numel()] = src_values[h, idx]
    device = src_keys.device
    return keys, values, offsets.to(device=device, dtype=torch.int32), counts.to(device=device, dtype=torch.int32).unsqueeze(0)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _compact_kernel(
    SrcK, SrcV, KeptIndex, Offsets, Counts, FirstKept,  # Offsets [Hkv+1], Counts/FirstKept [Hkv] int32
    OutK, OutV,  # [C, D] contiguous
    capacity,
    stride_kh, stride_kt, stride_kd,
    stride_vh, stride_vt, stride_vd,
    HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows
    row_ok = rows < capacity
    # head of each row = number of segment ends <= row
    hs = tl.arange(0, BLOCK_H)
    ends = tl.load(Offsets + 1 + hs, mask=hs < HKV, other=2147483647)  # [BLOCK_H]
    head = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), 1)  # [BLOCK_R]
    head = tl.minimum(head, HKV - 1)
    seg_start = tl.load(Offsets + head)
    count = tl.load(Counts + head)
    first = tl.load(FirstKept + head)
    rank = rows - seg_start
    is_kept = row_ok & (rank < count)
    src = tl.load(KeptIndex + first + rank, mask=is_kept, other=0).to(tl.int64)  # source token
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    load_mask = is_kept[:, None] & d_ok[None, :]
    store_mask = row_ok[:, None] & d_ok[None, :]
    out_off = rows[:, None].to(tl.int64) * D + d[None, :]
    k = tl.load(SrcK + head[:, None].to(tl.int64) * stride_kh + src[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=load_mask, other=0.0)
    tl.store(OutK + out_off, k, mask=store_mask)  # headroom rows: zeros
    v = tl.load(SrcV + head[:, None].to(tl.int64) * stride_vh + src[:, None] * stride_vt + d[None, :] * stride_vd,
                mask=load_mask, other=0.0)
    tl.store(OutV + out_off, v, mask=store_mask)


# --------------------------------------------------------------------------- launcher


def compact(
    src_keys: torch.Tensor,  # [Hkv, T, D]
    src_values: torch.Tensor,  # [Hkv, T, D]
    kept,  # list of Hkv sorted int64 index tensors, or a tuple (kept_index [total], counts [Hkv])
    headroom: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> keys [1, C, D], values [1, C, D], offsets [Hkv + 1] int32, lengths [1, Hkv] int32."""
    num_heads, _, head_dim = src_keys.shape
    assert src_values.shape == src_keys.shape
    device = src_keys.device
    kept_index, counts = _normalise_kept(kept, num_heads, device)  # counts on host (capacity needs it)
    offsets = _layout(counts, headroom)
    capacity = int(offsets[-1])
    first = torch.zeros(num_heads, dtype=torch.int64)
    first[1:] = torch.cumsum(counts, 0)[:-1]
    offsets_d = offsets.to(device=device, dtype=torch.int32)
    counts_d = counts.to(device=device, dtype=torch.int32)
    keys = torch.empty(1, capacity, head_dim, dtype=src_keys.dtype, device=device)
    values = torch.empty(1, capacity, head_dim, dtype=src_values.dtype, device=device)
    if capacity > 0:
        block_d = max(16, triton.next_power_of_2(head_dim))
        block_r = max(1, min(64, 8192 // block_d))  # 64 rows x 128 dims per program
        block_h = max(2, triton.next_power_of_2(num_heads))
        if kept_index.numel() == 0:
            kept_index = torch.zeros(1, dtype=torch.int64, device=device)  # never read
        _compact_kernel[(triton.cdiv(capacity, block_r),)](
            src_keys, src_values, kept_index, offsets_d, counts_d, first.to(device=device, dtype=torch.int32),
            keys, values, capacity,
            *src_keys.stride(), *src_values.stride(),
            HKV=num_heads, D=head_dim, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4,
        )
    return keys, values, offsets_d, counts_d.unsqueeze(0)


# --------------------------------------------------------------------------- benchmark


def benchmark(device: str = "cuda", dtype=torch.bfloat16,
              shapes=((8192, 2048), (32768, 8192), (131072, 32768), (524288, 131072))) -> None:
    """Kernel vs torch indexing (compact_reference and LayerCache.from_kept), GB/s moved."""
    from triton.testing import do_bench

    from kvcli.cache import LayerCache

    from .decode_attention import skewed_lengths

    torch.manual_seed(0)
    num_heads, head_dim, headroom = 8, 128, 512
    print(f"compact  Hkv={num_heads} D={head_dim} {dtype} headroom={headroom}, lognormal per-head budgets")
    print(f"{'T':>7} {'kept mean':>9} {'kernel us':>9} {'GB/s':>6} {'reference us':>12} {'from_kept us':>12} {'speedup':>7}")
    for length, mean in shapes:
        src_k = torch.randn(num_heads, length, head_dim, device=device, dtype=dtype)
        src_v = torch.randn_like(src_k)
        counts = skewed_lengths(num_heads, mean).clamp(max=length)
        kept = [torch.randperm(length, device=device)[: int(c)].sort().values for c in counts]
        positions = torch.arange(length, device=device)
        t = do_bench(lambda: compact(src_k, src_v, kept, headroom), warmup=10, rep=50)
        t_ref = do_bench(lambda: compact_reference(src_k, src_v, kept, headroom), warmup=3, rep=20)
        t_fk = do_bench(lambda: LayerCache.from_kept(src_k, src_v, positions, kept, headroom), warmup=3, rep=20)
        out = compact(src_k, src_v, kept, headroom)
        moved = 2 * out[0].numel() * out[0].element_size() + 2 * int(counts.sum()) * head_dim * src_k.element_size()
        print(f"{length:>7} {mean:>9} {t * 1e3:>9.1f} {moved / t / 1e6:>6.0f} {t_ref * 1e3:>12.1f} {t_fk * 1e3:>12.1f} {t_fk / t:>6.1f}x")
        del src_k, src_v


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=benchmark.__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    benchmark(dtype=getattr(torch, args.dtype))
