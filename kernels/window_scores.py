"""Observation-window scores for KV eviction (SnapKV, Ada-KV, KVzip), without the W x T matrix.

SnapKV (Li et al., 2024) and Ada-KV (Feng et al., 2024) score each cached token by the
attention it receives from an observation window (the last W prompt tokens), summed over
the window and averaged over the query heads of a GQA group; KVzip (Kim et al., 2025)
scores by the *max* attention received from its context-reconstruction queries (W in the
thousands), over queries and group.

    q       [Hq, W, D]    window queries (rotated); query i sees keys 0 .. causal_offset + i
    keys    [Hkv, T, D]   (causal_offset = T - W: the window is the last W tokens)
    scores  [Hkv, T] fp32 reduce="sum": sum over queries, mean over the group
                          reduce="max": max over queries and group
Keys no query sees score 0.

Two passes, as FlashAttention's backward pass does:
  1. log-sum-exp of every query row over its visible keys, in blocks of keys (split over
     keys into chunks when there are few query rows, e.g. SnapKV's W=32, then the chunks'
     partial LSEs are merged by a torch logsumexp over a [Hkv, splits, G*W] tensor);
  2. each program owns a block of keys, loads it once, recomputes q.k for every query row
     of the group, exponentiates against the LSE and reduces: no atomics, no W x T buffer.
The G query heads of a KV head are packed with their queries (row r = i * G + g, query-major
so a block of rows shares nearly the same causal limit) into one tl.dot operand.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- reference


def window_scores_reference(
    q: torch.Tensor,  # [Hq, W, D]
    keys: torch.Tensor,  # [Hkv, T, D]
    scale: float,
    causal_offset: int,
    reduce: str = "sum",
) -> torch.Tensor:  # [Hkv, T] fp32
    """Materialises the [Hq, W, T] probabilities in fp32 (tests only)."""
    num_q_heads, window, head_dim = q.shape
    num_kv_heads, length, _ = keys.shape
    group = num_q_heads // num_kv_heads
    logits = torch.einsum("hgwd,htd->hgwt", q.float().view(num_kv_heads, group, window, head_dim), keys.float()) * scale
    visible = torch.arange(length)[None, :] <= (causal_offset + torch.arange(window))[:, None]  # [W, T]
    probs = logits.masked_fill(~visible.to(q.device), float("-inf")).softmax(-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees no key contributes nothing
    if reduce == "max":
        return probs.amax(dim=(1, 2))
    if reduce == "sum":
        return probs.sum(2).mean(1)
    raise ValueError(f"reduce must be 'sum' or 'max', not {reduce!r}")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _lse_kernel(
    Q, K, Part,  # Part [Hkv, splits, R_pad] fp32: partial log2-sum-exp2 per row and key chunk
    scale_log2,
    stride_qh, stride_qw, stride_qd,
    stride_kh, stride_kt, stride_kd,
    T, W, causal_offset, CHUNK, num_splits, r_pad,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * W
    i = rows // G
    g = rows % G
    limit = causal_offset + i  # last visible key (inclusive)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + (h * G + g)[:, None].to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qw
                + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    i_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, W - 1)
    hi = tl.minimum(T, causal_offset + i_last + 1)  # keys past hi: nobody in this block sees them
    lo = pid_s * CHUNK
    hi = tl.minimum(hi, lo + CHUNK)
    k_base = K + h.to(tl.int64) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n_idx = start + tl.arange(0, BLOCK_N)
        n_ok = n_idx < hi
        k = tl.load(k_base + n_idx[:, None].to(tl.int64) * stride_kt + d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        s = tl.where((n_idx[None, :] <= limit[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    part = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(Part + (h * num_splits + pid_s).to(tl.int64) * r_pad + rows, part)


@triton.jit
def _scores_kernel(
    Q, K, Lse, Out,  # Lse [Hkv, R_pad] fp32 (log2 domain), Out [Hkv, T] fp32
    scale_log2,
    stride_qh, stride_qw, stride_qd,
    stride_kh, stride_kt, stride_kd,
    T, W, causal_offset, r_pad,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    REDUCE_MAX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0)
    pid_n = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    n_idx = n0 + tl.arange(0, BLOCK_N)
    n_ok = n_idx < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k = tl.load(K + h.to(tl.int64) * stride_kh + n_idx[:, None].to(tl.int64) * stride_kt + d[None, :] * stride_kd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_N], tl.float32)
    # first query that sees key n0 is i = n0 - causal_offset: skip the row blocks before it
    i_first = tl.maximum(n0 - causal_offset, 0)
    r_lo = (i_first * G // BLOCK_M) * BLOCK_M
    for r0 in range(r_lo, G * W, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < G * W
        i = rows // G
        g = rows % G
        q = tl.load(Q + (h * G + g)[:, None].to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qw
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(Lse + h.to(tl.int64) * r_pad + rows, mask=row_ok, other=float("-inf"))
        s = _dot(q, tl.trans(k), IEEE) * scale_log2  # [BLOCK_M, BLOCK_N]
        ok = (n_idx[None, :] <= (causal_offset + i)[:, None]) & n_ok[None, :] & (row_ok & (lse > float("-inf")))[:, None]
        p = tl.where(ok, tl.exp2(s - tl.where(lse > float("-inf"), lse, 0.0)[:, None]), 0.0)
        if REDUCE_MAX:
            acc = tl.maximum(acc, tl.max(p, 0))
        else:
            acc += tl.sum(p, 0)
    if not REDUCE_MAX:
        acc = acc / G
    tl.store(Out + h.to(tl.int64) * T + n_idx, acc, mask=n_ok)


# --------------------------------------------------------------------------- launcher


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def window_scores(
    q: torch.Tensor,  # [Hq, W, D]
    keys: torch.Tensor,  # [Hkv, T, D]
    scale: float,
    causal_offset: int,
    reduce: str = "sum",
    *,
    num_splits: int | None = None,  # key chunks of pass 1 (None: heuristic)
) -> torch.Tensor:  # [Hkv, T] fp32
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', not {reduce!r}")
    num_q_heads, window, head_dim = q.shape
    num_kv_heads, length, head_dim_k = keys.shape
    assert head_dim == head_dim_k and num_q_heads % num_kv_heads == 0
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_kv_heads, length, dtype=torch.float32, device=keys.device)
    if length == 0 or window == 0 or num_kv_heads == 0:
        return out
    rows = group * window
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if block_d <= 128 else 32
    block_n = 64 if block_d <= 128 else 32
    num_warps = 4 if block_d <= 128 else 8
    m_blocks = triton.cdiv(rows, block_m)
    r_pad = m_blocks * block_m
    if num_splits is None:
        by_length = triton.cdiv(length, 4 * block_n)
        wanted = triton.cdiv(4 * _num_sms(q.device), num_kv_heads * m_blocks)
        num_splits = max(1, min(by_length, wanted, 256))
    chunk = triton.cdiv(triton.cdiv(length, num_splits), block_n) * block_n
    splits = triton.cdiv(length, chunk)
    ieee = q.dtype == torch.float32
    upcast = interpreting() and q.dtype == torch.bfloat16  # interpreter's tl.dot mishandles bf16
    scale_log2 = scale * LOG2E

    part = torch.empty(num_kv_heads, splits, r_pad, dtype=torch.float32, device=q.device)
    _lse_kernel[(num_kv_heads, m_blocks, splits)](
        q, keys, part, scale_log2,
        *q.stride(), *keys.stride(),
        length, window, causal_offset, chunk, splits, r_pad,
        G=group, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE=ieee, UPCAST=upcast, num_warps=num_warps, num_stages=2,
    )
    # merge the chunks' partial LSEs (log2 domain): a [Hkv, splits, G*W] tensor, cheap
    lse = part[:, 0] if splits == 1 else torch.logsumexp(part * math.log(2.0), dim=1) * LOG2E
    lse = lse.contiguous()
    _scores_kernel[(num_kv_heads, triton.cdiv(length, block_n))](
        q, keys, lse, out, scale_log2,
        *q.stride(), *keys.stride(),
        length, window, causal_offset, r_pad,
        G=group, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        REDUCE_MAX=reduce == "max", IEEE=ieee, UPCAST=upcast, num_warps=num_warps, num_stages=2,
    )
    return out


# --------------------------------------------------------------------------- benchmark


SHAPES = [(2048, 32, "sum"), (32768, 32, "sum"), (131072, 32, "sum"),  # SnapKV / Ada-KV window
          (8192, 1024, "max"), (32768, 2048, "max"), (131072, 4096, "max")]  # KVzip-like probes


def benchmark(device: str = "cuda", dtype=torch.bfloat16, shapes=SHAPES) -> None:
    """Kernel vs the materialising torch reference (where it fits in memory)."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    num_kv_heads, group, head_dim = 8, 4, 128
    scale = head_dim ** -0.5
    print(f"window_scores  Hkv={num_kv_heads} G={group} D={head_dim} {dtype}, window = last W tokens")
    print(f"{'T':>7} {'W':>5} {'reduce':>6} {'kernel us':>10} {'TFLOP/s':>8} {'torch ref us':>12} {'speedup':>7} {'max rel err':>11}")
    for length, window, reduce in shapes:
        q = torch.randn(num_kv_heads * group, window, head_dim, device=device, dtype=dtype)
        keys = torch.randn(num_kv_heads, length, head_dim, device=device, dtype=dtype)
        off = length - window
        fn = lambda: window_scores(q, keys, scale, off, reduce)  # noqa: E731
        t = do_bench(fn, warmup=10, rep=50)
        flops = 2 * 2 * num_kv_heads * group * window * length * head_dim  # q.k in both passes
        ref_bytes = 4 * num_kv_heads * group * window * length  # fp32 probabilities
        if ref_bytes <= 2 * 2**30:
            ref_fn = lambda: window_scores_reference(q, keys, scale, off, reduce)  # noqa: E731
            t_ref = do_bench(ref_fn, warmup=2, rep=10)
            ref = ref_fn()
            err = ((fn() - ref).abs().max() / ref.abs().max()).item()
            ref_cols = f"{t_ref * 1e3:>12.1f} {t_ref / t:>6.1f}x {err:>11.1e}"
        else:
            ref_cols = f"{'(too big)':>12} {'':>7} {'':>11}"
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{length:>7} {window:>5} {reduce:>6} {t * 1e3:>10.1f} {flops / t / 1e9:>8.1f} {ref_cols}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=benchmark.__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    benchmark(dtype=getattr(torch, args.dtype))
