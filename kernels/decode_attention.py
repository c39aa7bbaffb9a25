"""Flash-decoding attention over kvcli's flat, variable-length per-head KV cache.

Technique: FlashAttention's online softmax (Dao et al., 2022) with the *split-K* /
"Flash-Decoding" scheme (Dao, Haziza, Massa, Sizov, 2023): a decode step has few queries,
so parallelism comes from splitting every KV segment along the sequence into chunks; each
program writes a partial (row max, row sum, unnormalised output) to scratch and a small
second kernel combines the chunks. The cache is the one of `kvcli.cache.LayerCache`:
heads stored back to back, each with its own length (Ada-KV / KVzip budgets), so one
launch covers every (sequence, KV head) pair with its own length; chunks past a head's
length do no work, so skewed lengths balance themselves (long heads get more programs).

GQA: the G query heads of a KV head and their n causal queries are packed into one
[G*n (padded to >= 16), D] operand of `tl.dot`, so each K/V segment is read once per step.

    q        [B, Hq, n, D]     query i sees the first lengths[b, h] - (n - 1 - i) rows
    keys     [B, C, D]         KV head h owns rows offsets[h] : offsets[h + 1]
    values   [B, C, D]
    offsets  [Hkv + 1] int32
    lengths  [B, Hkv]   int32  (0 allowed: output zeros)
    out      [B, Hq, n, D]     dtype of q

Rows that see no key at all (lengths 0, or lengths < n for the early queries) get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- reference


def decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, n, D]
    keys: torch.Tensor,  # [B, C, D]
    values: torch.Tensor,  # [B, C, D]
    offsets: torch.Tensor,  # [Hkv + 1]
    lengths: torch.Tensor,  # [B, Hkv]
    scale: float,
) -> torch.Tensor:  # [B, Hq, n, D], dtype of q
    """Plain torch, fp32 math, one (sequence, KV head) at a time. Same semantics as
    `kvcli.cache.attend_reference`, except that rows seeing no key give 0 instead of NaN."""
    batch, num_q_heads, n, _ = q.shape
    num_kv_heads = offsets.numel() - 1
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(num_kv_heads):
            start, length = int(offsets[h]), int(lengths[b, h])
            k = keys[b, start : start + length].float()  # [S, D]
            v = values[b, start : start + length].float()
            qq = q[b, h * group : (h + 1) * group].float()  # [G, n, D]
            logits = qq @ k.T * scale  # [G, n, S]
            limit = length - (n - 1 - torch.arange(n, device=q.device))  # [n]
            visible = torch.arange(length, device=q.device)[None, :] < limit[:, None]  # [n, S]
            logits = logits.masked_fill(~visible, float("-inf"))
            probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)  # rows with no key -> 0
            out[b, h * group : (h + 1) * group] = (probs @ v).to(q.dtype)
    return out


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: exact fp32 products (the default would be tf32 on GPUs).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _decode_attention_kernel(
    Q, K, V, Offsets, Lengths,
    Out,  # [B, Hq, n, D]                 (used when not SPLIT)
    Mid_m, Mid_l,  # [pairs, splits, M_pad] fp32 (used when SPLIT)
    Mid_acc,  # [pairs, splits, M_pad, BLOCK_D] fp32
    scale_log2,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kc, stride_kd,
    stride_vb, stride_vc, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_splits, m_pad, N_Q, CHUNK,  # runtime ints: no recompilation as lengths / n change
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_pair = tl.program_id(0)  # b * HKV + h
    pid_split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_pair // HKV
    h = pid_pair % HKV
    seg_start = tl.load(Offsets + h).to(tl.int64)
    length = tl.load(Lengths + pid_pair)
    chunk_lo = pid_split * CHUNK
    chunk_hi = tl.minimum(chunk_lo + CHUNK, length)

    # packed query rows: r = g * n + i  (query head h*G + g, query i)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * N_Q
    g = rows // N_Q
    i = rows % N_Q
    limit = length - (N_Q - 1 - i)  # query i sees rows [0, limit)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None].to(tl.int64) * stride_qh
              + i[:, None] * stride_qn + d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    k_base = K + b.to(tl.int64) * stride_kb + seg_start * stride_kc
    v_base = V + b.to(tl.int64) * stride_vb + seg_start * stride_vc
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(chunk_lo, chunk_hi, BLOCK_N):
        n_idx = start + tl.arange(0, BLOCK_N)
        n_ok = n_idx < chunk_hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n_idx[:, None].to(tl.int64) * stride_kc + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n_idx[:, None].to(tl.int64) * stride_vc + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2  # [BLOCK_M, BLOCK_N], log2 domain
        visible = (n_idx[None, :] < limit[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)  # 16-bit P for the tensor-core PV product, as FlashAttention
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new

    if SPLIT:
        # scratch [pairs, m_pad, splits(, BLOCK_D)]: the combine reads a row's splits contiguously
        mid = (pid_pair.to(tl.int64) * m_pad + rows) * num_splits + pid_split  # [BLOCK_M]
        # empty chunks are never read by the combine: skip their stores (tensor mask, as the
        # interpreter rejects scalar & tensor masks)
        ok = row_ok & ((rows * 0 + chunk_lo) < length)
        tl.store(Mid_m + mid, m_i, mask=ok)
        tl.store(Mid_l + mid, l_i, mask=ok)
        tl.store(Mid_acc + mid[:, None] * BLOCK_D + d[None, :], acc, mask=ok[:, None] & (d < BLOCK_D)[None, :])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key seen: acc = 0 -> out = 0
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + (h * G + g)[:, None].to(tl.int64) * stride_oh
                  + i[:, None] * stride_on + d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    Mid_m, Mid_l, Mid_acc, Lengths, Out,
    stride_ob, stride_oh, stride_on, stride_od,
    num_splits, m_pad, N_Q, CHUNK,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """One program per (pair, query row, BLOCK_DC columns): merges the row's active chunks
    BLOCK_S at a time (lane j merges chunks j, j + BLOCK_S, ... online; the lanes are merged
    at the end). Splitting the columns gives a decode step (8 pairs x 4 rows) 4x the
    programs, and each walks its partials in quarter-width loads."""
    pid_pair = tl.program_id(0)
    r = tl.program_id(1)  # packed query row g * n + i
    b = pid_pair // HKV
    h = pid_pair % HKV
    length = tl.load(Lengths + pid_pair)
    active = tl.cdiv(length, CHUNK)  # chunks that hold rows of this head
    base = (pid_pair.to(tl.int64) * m_pad + r) * num_splits
    d = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    m_v = tl.full([BLOCK_S], float("-inf"), tl.float32)
    l_v = tl.zeros([BLOCK_S], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_DC], tl.float32)
    for s0 in range(0, active, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < active
        m_s = tl.load(Mid_m + base + s, mask=s_ok, other=float("-inf"))
        l_s = tl.load(Mid_l + base + s, mask=s_ok, other=0.0)
        a_s = tl.load(Mid_acc + (base + s)[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        m_new = tl.maximum(m_v, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_v - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_v = l_v * alpha + l_s * beta
        acc_v = acc_v * alpha[:, None] + a_s * beta[:, None]
        m_v = m_new
    m_all = tl.max(m_v, 0)
    w = tl.exp2(m_v - tl.where(m_all == float("-inf"), 0.0, m_all))  # [BLOCK_S]
    l_all = tl.sum(l_v * w, 0)
    acc = tl.sum(acc_v * w[:, None], 0)  # [BLOCK_DC]
    out = acc / tl.where(l_all > 0, l_all, 1.0)  # no key seen: acc = 0 -> out = 0
    g = r // N_Q
    i = r % N_Q
    o_ptrs = Out + b.to(tl.int64) * stride_ob + (h * G + g).to(tl.int64) * stride_oh + i * stride_on + d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d < D)


# --------------------------------------------------------------------------- launcher


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: pretend H100, only changes the split heuristic


# The split plan and combine width measured best on an H200 at every decode length (4K-131K
# kept a head, graph-replayed; kernels/NOTES.md section 5, BENCHMARKS.md).
PROGRAMS_PER_SM = 2
COMBINE_COLUMNS = 32


def choose_splits(max_length: int, total_rows: int, block_n: int, num_sms: int,
                  programs_per_sm: int = PROGRAMS_PER_SM, max_splits: int = 1024) -> tuple[int, int]:
    """(num_splits, chunk rows) of the split-K plan; chunks past a head's length exit at once.

    Chunks (whole blocks) are sized from the `total_rows` held (every head's segment, all
    sequences and query blocks), so that about programs_per_sm programs per SM have work
    whatever the skew between heads. Two, measured on an H200 against 4, 8 and 16 and
    against sizing from the longest head (which left ~2 working programs per SM at 3.7x the
    chunk): 53% of copy bandwidth at 4K mean vs 39%, 91% vs 71% at 13K (NOTES.md section 5).
    """
    if max_length <= 0:
        return 1, block_n
    per_program = triton.cdiv(max(total_rows, 1), programs_per_sm * num_sms)
    chunk = max(block_n, triton.cdiv(per_program, block_n) * block_n)
    return _chunking(max_length, min(triton.cdiv(max_length, chunk), max_splits), block_n)


def _chunking(max_length: int, splits: int, block_n: int) -> tuple[int, int]:
    chunk = triton.cdiv(triton.cdiv(max(max_length, 1), max(splits, 1)), block_n) * block_n
    return triton.cdiv(max(max_length, 1), chunk), chunk


def launch_config(batch, num_kv_heads, group, n, head_dim, max_length, device, *, total_rows=None,
                  num_splits=None, block_n=None, num_warps=None, num_stages=None, programs_per_sm=PROGRAMS_PER_SM,
                  combine_columns=COMBINE_COLUMNS) -> dict:
    """Tile sizes and split-K plan of `decode_attention` (also printed by the benchmark).

    total_rows: rows per sequence the cache holds (its capacity; default max_length per head);
    programs_per_sm: see choose_splits; combine_columns: columns per combine program (each
    query row's merge of the splits is spread over D / combine_columns programs).
    """
    rows = group * n  # packed query rows per KV head
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(max(16, triton.next_power_of_2(rows)), 64 if block_d <= 128 else 32)
    m_blocks = triton.cdiv(rows, block_m)
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    if num_warps is None:
        num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    if num_stages is None:
        num_stages = 3 if block_d <= 128 else 2
    if total_rows is None:
        total_rows = num_kv_heads * max_length
    if num_splits is None:
        splits, chunk = choose_splits(max_length, batch * total_rows * m_blocks, block_n, _num_sms(torch.device(device)),
                                      programs_per_sm)
    else:
        splits, chunk = _chunking(max_length, num_splits, block_n)
    block_dc = min(block_d, combine_columns)  # combine: columns per program
    block_s = min(triton.next_power_of_2(splits), 32 * 128 // block_dc)  # combine: splits per step ([block_s, block_dc] fp32)
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, m_blocks=m_blocks, splits=splits, chunk=chunk,
                num_warps=num_warps, num_stages=num_stages, block_s=block_s, block_dc=block_dc)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, n, D]
    keys: torch.Tensor,  # [B, C, D]
    values: torch.Tensor,  # [B, C, D]
    offsets: torch.Tensor,  # [Hkv + 1] int32
    lengths: torch.Tensor,  # [B, Hkv] int32
    scale: float,
    *,
    max_length: int | None = None,  # >= lengths.max(); pass it (e.g. max segment size) to avoid a sync
    num_splits: int | None = None,  # None: heuristic; 1: no split (no combine kernel)
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs_per_sm: int = PROGRAMS_PER_SM,  # see choose_splits
    combine_columns: int = COMBINE_COLUMNS,  # see launch_config
) -> torch.Tensor:  # [B, Hq, n, D], dtype of q
    batch, num_q_heads, n, head_dim = q.shape
    assert keys.shape[0] == batch and values.shape == keys.shape and keys.shape[2] == head_dim
    assert keys.dtype == values.dtype == q.dtype, f"q {q.dtype}, keys {keys.dtype}, values {values.dtype}: cast first"
    num_kv_heads = offsets.numel() - 1
    assert num_q_heads % num_kv_heads == 0 and lengths.shape == (batch, num_kv_heads)
    group = num_q_heads // num_kv_heads
    out = torch.empty(batch, num_q_heads, n, head_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    offsets = offsets.to(device=q.device, dtype=torch.int32).contiguous()
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    if max_length is None:
        max_length = int(lengths.max()) if lengths.numel() else 0  # host sync

    cfg = launch_config(batch, num_kv_heads, group, n, head_dim, max_length, q.device, total_rows=keys.shape[1],
                        num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        programs_per_sm=programs_per_sm, combine_columns=combine_columns)
    block_m, block_n, block_d, m_blocks = cfg["block_m"], cfg["block_n"], cfg["block_d"], cfg["m_blocks"]
    splits, chunk, num_warps, num_stages = cfg["splits"], cfg["chunk"], cfg["num_warps"], cfg["num_stages"]
    pairs = batch * num_kv_heads
    split = splits > 1

    ieee = q.dtype == torch.float32
    upcast = interpreting() and q.dtype == torch.bfloat16  # interpreter's tl.dot mishandles bf16
    m_pad = m_blocks * block_m
    if split:
        mid_m = torch.empty(pairs, m_pad, splits, dtype=torch.float32, device=q.device)
        mid_l = torch.empty_like(mid_m)
        mid_acc = torch.empty(pairs, m_pad, splits, block_d, dtype=torch.float32, device=q.device)
    else:
        mid_m = mid_l = mid_acc = out  # unused
    _decode_attention_kernel[(pairs, splits, m_blocks)](
        q, keys, values, offsets, lengths, out, mid_m, mid_l, mid_acc,
        scale * LOG2E,
        *q.stride(), *keys.stride(), *values.stride(), *out.stride(),
        splits, m_pad, n, chunk,
        HKV=num_kv_heads, G=group, D=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=split, IEEE=ieee, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _combine_kernel[(pairs, group * n, block_d // cfg["block_dc"])](
            mid_m, mid_l, mid_acc, lengths, out,
            *out.stride(),
            splits, m_pad, n, chunk,
            HKV=num_kv_heads, G=group, D=head_dim,
            BLOCK_S=cfg["block_s"], BLOCK_D=block_d, BLOCK_DC=cfg["block_dc"],
            num_warps=4,
        )
    return out


# --------------------------------------------------------------------------- benchmark


def skewed_lengths(num_heads: int, mean: int, sigma: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ada-KV-like per-head budgets: lognormal, normalised so the mean is `mean`. [num_heads] int64."""
    w = torch.empty(num_heads).log_normal_(0.0, sigma, generator=generator)
    return (w / w.mean() * mean).round().clamp(min=1).long()


def make_cache(batch: int, lengths: torch.Tensor, head_dim: int, headroom: int, dtype, device):
    """Random flat cache: lengths [B, Hkv] -> keys, values [B, C, D], offsets [Hkv + 1] int32."""
    segment = lengths.max(0).values + headroom  # [Hkv]
    offsets = torch.zeros(segment.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(segment, 0)
    capacity = int(offsets[-1])
    keys = torch.randn(batch, capacity, head_dim, device=device, dtype=dtype)
    values = torch.randn(batch, capacity, head_dim, device=device, dtype=dtype)
    return keys, values, offsets.to(device=device, dtype=torch.int32)


def benchmark(device: str = "cuda", dtype=torch.bfloat16, means=(2048, 8192, 32768, 131072), ns=(1, 4, 16),
              copy_elements: int = 2**29) -> None:
    """Kernel vs torch reference, and achieved GB/s (K/V bytes read / time) vs a device-to-device copy."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    num_kv_heads, head_dim, group, batch = 8, 128, 4, 1
    scale = head_dim ** -0.5
    # what a plain torch copy achieves on this GPU (read + write of 1 GiB)
    src = torch.empty(copy_elements, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_gbs = 2 * src.numel() * src.element_size() / t_copy / 1e6
    del src, dst
    print(f"torch device-to-device copy of {2 * copy_elements >> 20} MiB: {copy_gbs:7.0f} GB/s (bytes read + written / time)\n")
    print(f"decode_attention  B={batch} Hkv={num_kv_heads} G={group} D={head_dim} {dtype}, lognormal(sigma=1) per-head lengths")
    print(f"{'mean kept':>9} {'max kept':>8} {'n':>3} {'splits':>6} {'kernel us':>9} {'GB/s':>6} {'%copy':>6} {'torch ref us':>12} {'speedup':>7} {'max err':>8}")
    for mean in means:
        lengths = torch.stack([skewed_lengths(num_kv_heads, mean) for _ in range(batch)])  # [B, Hkv]
        keys, values, offsets = make_cache(batch, lengths, head_dim, 512, dtype, device)
        lengths_d = lengths.to(device=device, dtype=torch.int32)
        max_len = int(lengths.max())
        kv_bytes = 2 * int(lengths.sum()) * head_dim * keys.element_size()
        for n in ns:
            q = torch.randn(batch, num_kv_heads * group, n, head_dim, device=device, dtype=dtype)
            fn = lambda: decode_attention(q, keys, values, offsets, lengths_d, scale, max_length=max_len)  # noqa: E731
            t = do_bench(fn, warmup=25, rep=100, return_mode="median")
            ref_fn = lambda: decode_attention_reference(q, keys, values, offsets, lengths_d, scale)  # noqa: E731
            t_ref = do_bench(ref_fn, warmup=2, rep=20, return_mode="median")
            err = (fn().float() - ref_fn().float()).abs().max().item()
            splits = launch_config(batch, num_kv_heads, group, n, head_dim, max_len, device, total_rows=keys.shape[1])["splits"]
            gbs = kv_bytes / t / 1e6
            print(f"{mean:>9} {max_len:>8} {n:>3} {splits:>6} {t * 1e3:>9.1f} {gbs:>6.0f} {100 * gbs / copy_gbs:>5.0f}% "
                  f"{t_ref * 1e3:>12.1f} {t_ref / t:>6.1f}x {err:>8.1e}")
        del keys, values


def sweep(device: str = "cuda", dtype=torch.bfloat16, mean: int = 32768, n: int = 1) -> None:
    """GB/s of every (block_n, num_warps, num_stages, splits) on one shape: to retune the defaults."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    num_kv_heads, head_dim, group = 8, 128, 4
    lengths = skewed_lengths(num_kv_heads, mean).view(1, -1)
    keys, values, offsets = make_cache(1, lengths, head_dim, 512, dtype, device)
    lengths_d = lengths.to(device=device, dtype=torch.int32)
    max_len = int(lengths.max())
    q = torch.randn(1, num_kv_heads * group, n, head_dim, device=device, dtype=dtype)
    kv_bytes = 2 * int(lengths.sum()) * head_dim * keys.element_size()
    default = launch_config(1, num_kv_heads, group, n, head_dim, max_len, device, total_rows=keys.shape[1])
    print(f"sweep: mean kept {mean}, max {max_len}, n={n}; default {default}")
    print(f"{'block_n':>7} {'warps':>5} {'stages':>6} {'splits':>6} {'us':>8} {'GB/s':>6}")
    for block_n in (64, 128, 256):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 4):
                for splits in (None, 64, 128, 256):
                    try:
                        t = do_bench(lambda: decode_attention(q, keys, values, offsets, lengths_d, 0.1, max_length=max_len,
                                                              num_splits=splits, block_n=block_n, num_warps=num_warps,
                                                              num_stages=num_stages), warmup=10, rep=50)
                    except Exception as exc:  # e.g. out of shared memory
                        print(f"{block_n:>7} {num_warps:>5} {num_stages:>6} {str(splits):>6}  failed: {type(exc).__name__}")
                        continue
                    used = launch_config(1, num_kv_heads, group, n, head_dim, max_len, device, num_splits=splits,
                                         block_n=block_n)["splits"]
                    print(f"{block_n:>7} {num_warps:>5} {num_stages:>6} {used:>6} {t * 1e3:>8.1f} {kv_bytes / t / 1e6:>6.0f}")


def graph_replayed_us(fn, calls: int = 20) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph of `calls` back-to-back calls
    (how decode runs it: no launch overhead from the host, only the GPU's own gaps)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3 / calls


def graph_benchmark(device: str = "cuda", dtype=torch.bfloat16, means=(4096, 13107, 32768, 131072),
                    programs=(2, 4, 8, 16), columns=(32, 128), block_ns=(64, 128)) -> list[dict]:
    """Decode's shape (B=1, 8 KV heads x 4 query heads, D=128, n=1, lognormal(sigma=1)
    lengths, 512 rows of headroom per head, max_length = the segment size as decode passes
    it), graph-replayed: every plan of programs per SM x combine columns x block_n on the
    same inputs, the default first (to retune it: kernels/NOTES.md section 5). Returns the
    rows; prints a table."""
    torch.manual_seed(0)
    num_kv_heads, head_dim, group = 8, 128, 4
    # The copy reference is an eager 1 GiB device copy, as kvcli.benchmarks.e2e measures it
    # (4.24 TB/s on an H200). Graph-replayed, the same copy measured 2.77 TB/s (captured, it
    # is a graph memcpy node, not the copy that kernels' bandwidth compares to).
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e6)
    del src, dst
    print(f"copy {copy_gbs:.0f} GB/s (eager 1 GiB device copy, read + write); decode_attention B=1 Hkv=8 G=4 D=128 n=1 {dtype}")
    print(f"{'mean':>7} {'config':>44} {'splits':>6} {'us':>7} {'GB/s':>6} {'%copy':>6}")
    default = {"programs_per_sm": PROGRAMS_PER_SM, "combine_columns": COMBINE_COLUMNS, "block_n": 64}
    rows = []
    for mean in means:
        lengths = skewed_lengths(num_kv_heads, mean).view(1, -1)
        keys, values, offsets = make_cache(1, lengths, head_dim, 512, dtype, device)
        lengths_d = lengths.to(device=device, dtype=torch.int32)
        max_len = int((offsets[1:] - offsets[:-1]).max())  # the segment size, as decode passes it
        q = torch.randn(1, num_kv_heads * group, 1, head_dim, device=device, dtype=dtype)
        kv_bytes = 2 * int(lengths.sum()) * head_dim * keys.element_size()
        plans = [default] + [
            plan for p in programs for c in columns for bn in block_ns
            if (plan := {"programs_per_sm": p, "combine_columns": c, "block_n": bn}) != default
        ]
        configs = {
            f"{'default: ' if plan is default else ''}{plan['programs_per_sm']}/SM, combine {plan['combine_columns']} cols, "
            f"block_n {plan['block_n']}": plan
            for plan in plans
        }
        for name, kwargs in configs.items():
            fn = lambda: decode_attention(q, keys, values, offsets, lengths_d, 0.1, max_length=max_len, **kwargs)  # noqa: E731
            us = graph_replayed_us(fn)
            cfg = launch_config(1, num_kv_heads, group, 1, head_dim, max_len, device, total_rows=keys.shape[1], **kwargs)
            gbs = kv_bytes / us / 1e3
            row = {"mean": mean, "config": name, "splits": cfg["splits"], "us": us, "gb_s": gbs, "copy_share": gbs / copy_gbs}
            rows.append(row)
            print(f"{mean:>7} {name:>44.44} {cfg['splits']:>6} {us:>7.1f} {gbs:>6.0f} {100 * gbs / copy_gbs:>5.0f}%")
        del keys, values
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=benchmark.__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also sweep tile sizes / splits on one shape")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep")
    parser.add_argument("--sweep-mean", type=int, default=32768, help="mean kept tokens per head of the swept shape")
    parser.add_argument("--sweep-n", type=int, default=1, help="queries per sequence of the swept shape")
    parser.add_argument("--graph", action="store_true", help="only the graph-replayed table at decode's shape")
    parser.add_argument("--json", default=None, help="with --graph: also write its rows here")
    parser.add_argument("--programs", default="2,4,8,16", help="with --graph: programs per SM to try (comma-separated)")
    parser.add_argument("--columns", default="32,128", help="with --graph: combine columns to try")
    parser.add_argument("--block-n", default="64,128", help="with --graph: block_n to try")
    args = parser.parse_args()
    if args.graph:
        def ints(text):
            return tuple(int(x) for x in text.split(","))

        rows = graph_benchmark(dtype=getattr(torch, args.dtype), programs=ints(args.programs), columns=ints(args.columns),
                               block_ns=ints(args.block_n))
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        raise SystemExit(0)
    if not args.sweep_only:
        benchmark(dtype=getattr(torch, args.dtype))
    if args.sweep or args.sweep_only:
        print()
        sweep(dtype=getattr(torch, args.dtype), mean=args.sweep_mean, n=args.sweep_n)
