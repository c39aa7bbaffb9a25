"""RMSNorm in one launch: y = weight * round(x / sqrt(mean(x^2) + eps)).

transformers' Llama/Mistral/Qwen RMSNorm is five to six kernels (upcast, square, mean,
rsqrt, two multiplies); in a decode step at batch 1 each of those is a launch that moves a
few kilobytes, so the launches cost more than the bytes. One program per row here, the
same arithmetic: statistics in fp32, the normalised row rounded to the input dtype, then
multiplied by the weight (in the weight's dtype), exactly as LlamaRMSNorm does.

    x      [rows, H]  (any float dtype)
    weight [H]
    out    [rows, H]  dtype of x
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, written out."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normalised = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normalised


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / H
    normalised = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normalised.to(tl.float32)).to(w.dtype)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> [..., H]; one program per row (H up to 16K fits one block)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.numel():
        hidden = shape[-1]
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), hidden, eps,
            BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out.view(shape)


def benchmark(device: str = "cuda", dtype=torch.bfloat16, hidden: int = 4096, rows=(1, 4, 8192)) -> None:
    """Kernel vs the torch reference: one row is a decode step, 8192 rows a prefill chunk."""
    from triton.testing import do_bench

    weight = torch.randn(hidden, device=device, dtype=dtype)
    print(f"rms_norm  H={hidden} {dtype}")
    print(f"{'rows':>6} {'kernel us':>9} {'torch us':>9} {'speedup':>7}")
    for n in rows:
        x = torch.randn(n, hidden, device=device, dtype=dtype)
        t = do_bench(lambda: rms_norm(x, weight, 1e-5), warmup=10, rep=50, return_mode="median")
        t_ref = do_bench(lambda: rms_norm_reference(x, weight, 1e-5), warmup=10, rep=50, return_mode="median")
        print(f"{n:>6} {t * 1e3:>9.1f} {t_ref * 1e3:>9.1f} {t_ref / t:>6.1f}x")


if __name__ == "__main__":
    benchmark()
