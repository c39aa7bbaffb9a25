"""SwiGLU's gate in one launch: out = silu(gate) * up, from the fused gate|up projection.

The decode fast path (kvcli.fastpath) multiplies by one concatenated [gate; up] weight, so
each row of its output is [gate (I values) | up (I values)]. transformers' MLP would run
act_fn and the product as two kernels on two separate projections.

    gate_up [rows, 2I]
    out     [rows, I]  silu computed in fp32, rounded to the input dtype, then the product
                       rounded again: the two roundings of act_fn(gate) * up in bf16/fp16
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, I, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> [..., I]."""
    shape = gate_up.shape
    rows = gate_up.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    inner = shape[-1] // 2
    out = torch.empty(rows.shape[0], inner, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        block = 1024
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](
            rows, out, rows.stride(0), out.stride(0), inner, BLOCK=block, num_warps=4,
        )
    return out.view(*shape[:-1], inner)


def benchmark(device: str = "cuda", dtype=torch.bfloat16, inner: int = 14336, rows=(1, 4, 8192)) -> None:
    from triton.testing import do_bench

    print(f"silu_mul  I={inner} {dtype}")
    print(f"{'rows':>6} {'kernel us':>9} {'torch us':>9} {'speedup':>7}")
    for n in rows:
        gu = torch.randn(n, 2 * inner, device=device, dtype=dtype)
        t = do_bench(lambda: silu_mul(gu), warmup=10, rep=50, return_mode="median")
        t_ref = do_bench(lambda: silu_mul_reference(gu), warmup=10, rep=50, return_mode="median")
        print(f"{n:>6} {t * 1e3:>9.1f} {t_ref * 1e3:>9.1f} {t_ref / t:>6.1f}x")


if __name__ == "__main__":
    benchmark()
