"""RoPE + cache append in one launch, from the fused q|k|v projection of the new tokens.

A decode step of transformers' Llama attention splits q/k/v, rotates q and k (about ten
small kernels: two multiplies, a rotate_half with its cat and negation, an add, for each)
and kvcli then writes k/v/positions into every head's segment (three scatters) and bumps
the lengths. At batch 1 those are launches that move kilobytes. Here one program per
(sequence, KV head) rotates its G query heads and its key head for the n new tokens,
writes the rotated key, the value and the position after the rows in use of its segment
in kvcli's flat layout (`kvcli.cache.LayerCache`), and adds n to its length.

    qkv        [B*n, (Hq + 2 Hkv) * D]   row b*n + i: [q heads | k heads | v heads]
    cos, sin   [B*n, D]                  the model's rotary embedding of each new token
    keys/values[B, C, D], positions [B, C] int32, offsets [Hkv + 1], lengths [B, Hkv] int32
    token_positions [B, n]
    returns q  [B, Hq, n, D] rotated (what the decode attention kernel takes)

Rotation as transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, with
rotate_half(x) = [-x2, x1] over the two halves of head_dim; computed in fp32 and rounded
once (transformers rounds after each op in bf16: differences are at rounding level).
The caller must have reserved room (no capacity check on the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by cos/sin [..., D] (broadcast), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x.float() * cos.float() + rotated_half * sin.float()


def rope_append_reference(qkv, cos, sin, keys, values, positions, offsets, lengths, token_positions, num_q_heads):
    """Plain torch, one (sequence, head) at a time: what the kernel must do."""
    batch, n = token_positions.shape
    num_kv_heads = offsets.numel() - 1
    head_dim = keys.shape[-1]
    group = num_q_heads // num_kv_heads
    rows = qkv.view(batch, n, num_q_heads + 2 * num_kv_heads, head_dim)
    cos, sin = cos.view(batch, n, 1, head_dim), sin.view(batch, n, 1, head_dim)
    q = rotate(rows[:, :, :num_q_heads], cos, sin).to(qkv.dtype).transpose(1, 2)  # [B, Hq, n, D]
    k = rotate(rows[:, :, num_q_heads : num_q_heads + num_kv_heads], cos, sin).to(keys.dtype)  # [B, n, Hkv, D]
    v = rows[:, :, num_q_heads + num_kv_heads :].to(values.dtype)
    for b in range(batch):
        for h in range(num_kv_heads):
            start = int(offsets[h]) + int(lengths[b, h])
            keys[b, start : start + n] = k[b, :, h]
            values[b, start : start + n] = v[b, :, h]
            positions[b, start : start + n] = token_positions[b].to(positions.dtype)
    lengths += n
    assert q.shape[1] == group * num_kv_heads
    return q.contiguous()


@triton.jit
def _rope_append_kernel(
    qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, positions_ptr, offsets_ptr, lengths_ptr, token_pos_ptr, q_ptr,
    stride_qkv, stride_cos, stride_kb, stride_kc, stride_vb, stride_vc, stride_pb, stride_tb,
    stride_qb, stride_qh, stride_qn,
    n,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    cols = tl.arange(0, HALF)
    length = tl.load(lengths_ptr + b * HKV + h)
    start = tl.load(offsets_ptr + h) + length
    for i in range(n):
        t = b * n + i
        c1 = tl.load(cos_ptr + t * stride_cos + cols).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_cos + HALF + cols).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_cos + cols).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_cos + HALF + cols).to(tl.float32)
        row = qkv_ptr + t * stride_qkv
        # key head h, rotated, into row start + i of its segment
        k_src = row + (HQ + h) * 2 * HALF
        x1 = tl.load(k_src + cols).to(tl.float32)
        x2 = tl.load(k_src + HALF + cols).to(tl.float32)
        dest = (start + i).to(tl.int64)
        k_dst = keys_ptr + b * stride_kb + dest * stride_kc
        tl.store(k_dst + cols, (x1 * c1 - x2 * s1).to(keys_ptr.dtype.element_ty))
        tl.store(k_dst + HALF + cols, (x2 * c2 + x1 * s2).to(keys_ptr.dtype.element_ty))
        v_src = row + (HQ + HKV + h) * 2 * HALF
        v_dst = values_ptr + b * stride_vb + dest * stride_vc
        tl.store(v_dst + cols, tl.load(v_src + cols).to(values_ptr.dtype.element_ty))
        tl.store(v_dst + HALF + cols, tl.load(v_src + HALF + cols).to(values_ptr.dtype.element_ty))
        tl.store(positions_ptr + b * stride_pb + dest, tl.load(token_pos_ptr + b * stride_tb + i).to(tl.int32))
        # the G query heads of this group
        for g in tl.static_range(G):
            hq = h * G + g
            q_src = row + hq * 2 * HALF
            y1 = tl.load(q_src + cols).to(tl.float32)
            y2 = tl.load(q_src + HALF + cols).to(tl.float32)
            q_dst = q_ptr + b * stride_qb + hq * stride_qh + i * stride_qn
            tl.store(q_dst + cols, (y1 * c1 - y2 * s1).to(q_ptr.dtype.element_ty))
            tl.store(q_dst + HALF + cols, (y2 * c2 + y1 * s2).to(q_ptr.dtype.element_ty))
    tl.store(lengths_ptr + b * HKV + h, length + n)


def rope_append(qkv, cos, sin, keys, values, positions, offsets, lengths, token_positions, num_q_heads) -> torch.Tensor:
    """See the module docstring. Updates keys/values/positions/lengths in place."""
    batch, n = token_positions.shape
    num_kv_heads = offsets.numel() - 1
    head_dim = keys.shape[-1]
    assert head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0, "head_dim must be twice a power of two"
    assert num_q_heads % num_kv_heads == 0
    assert qkv.shape == (batch * n, (num_q_heads + 2 * num_kv_heads) * head_dim) and qkv.stride(-1) == 1
    assert cos.shape == sin.shape == (batch * n, head_dim) and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert keys.stride(-1) == values.stride(-1) == 1 and positions.stride(-1) == 1
    assert lengths.is_contiguous() and lengths.dtype == torch.int32 and offsets.dtype == torch.int32
    q = torch.empty(batch, num_q_heads, n, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_append_kernel[(batch * num_kv_heads,)](
        qkv, cos, sin, keys, values, positions, offsets, lengths, token_positions, q,
        qkv.stride(0), cos.stride(0), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        positions.stride(0), token_positions.stride(0), q.stride(0), q.stride(1), q.stride(2),
        n,
        HQ=num_q_heads, HKV=num_kv_heads, G=num_q_heads // num_kv_heads, HALF=head_dim // 2,
        num_warps=1,
    )
    return q


def benchmark(device: str = "cuda", dtype=torch.bfloat16) -> None:
    """Kernel vs the reference's torch ops (split, rotate, scatter) for one decode step."""
    from triton.testing import do_bench

    num_q, num_kv, head_dim, capacity = 32, 8, 128, 4096
    print(f"rope_append  Hq={num_q} Hkv={num_kv} D={head_dim} {dtype}")
    print(f"{'B':>3} {'n':>4} {'kernel us':>9} {'torch us':>9} {'speedup':>7}")
    for batch, n in ((1, 1), (4, 1), (1, 32)):
        qkv = torch.randn(batch * n, (num_q + 2 * num_kv) * head_dim, device=device, dtype=dtype)
        angle = torch.randn(batch * n, head_dim // 2, device=device)
        cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
        keys = torch.zeros(batch, num_kv * capacity, head_dim, device=device, dtype=dtype)
        values, positions = torch.zeros_like(keys), torch.zeros(batch, num_kv * capacity, dtype=torch.int32, device=device)
        offsets = torch.arange(0, num_kv + 1, dtype=torch.int32, device=device) * capacity
        token_positions = torch.arange(n, device=device).expand(batch, n).contiguous()

        def kernel():
            lengths = torch.zeros(batch, num_kv, dtype=torch.int32, device=device)
            return rope_append(qkv, cos, sin, keys, values, positions, offsets, lengths, token_positions, num_q)

        def reference():
            lengths = torch.zeros(batch, num_kv, dtype=torch.int32, device=device)
            return rope_append_reference(qkv, cos, sin, keys, values, positions, offsets, lengths, token_positions, num_q)

        t = do_bench(kernel, warmup=10, rep=50, return_mode="median")
        t_ref = do_bench(reference, warmup=3, rep=20, return_mode="median")
        print(f"{batch:>3} {n:>4} {t * 1e3:>9.1f} {t_ref * 1e3:>9.1f} {t_ref / t:>6.1f}x")


if __name__ == "__main__":
    benchmark()
