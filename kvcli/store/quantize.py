"""Per-group integer quantization of K/V rows along head_dim, for the .kvc file.

Every row of `x` ([..., D]) is cut into groups of `group_size` consecutive values along
the last dimension (the last group is zero-padded when D is not a multiple); each group
gets its own fp16 scale, so an outlier channel only coarsens the 31 values next to it.

int8 (symmetric):   q = round(x / s) in [-127, 127],        s = absmax / 127
                    x' = q * s
int4 (asymmetric):  q = round((x - m) / s) in [0, 15],       s = (max - min) / 15, m <= min
                    x' = q * s + m,  two codes per byte (low nibble = even column)

Error bound, per group: |x - dequantize(quantize(x))| <= s / 2, where s is the *stored*
(fp16) scale of that group, up to float32 rounding of the dequantization itself
(a relative 2^-24 of |x|). The quantizer rounds on the stored fp16 values (m is rounded
down, s up, so [m, m + 15 s] always covers the group), hence the bound is exact and not
"plus fp16 rounding". In terms of the data, s is at most:

    int8: absmax / 127 * (1 + 2^-10)                          -> error <= absmax / 254 (+0.1%)
    int4: ((max - min) + |min| 2^-10) / 15 * (1 + 2^-10)      -> error <= (max - min) / 30 (+~0.1%)

(the |min| 2^-10 term is the fp16 rounding of the offset m; it only matters for a group
whose values all sit far from 0 relative to their spread). Asymmetric int4 was chosen
over symmetric because its step is (max - min) / 15 instead of 2 absmax / 15: up to 2x
smaller for groups that are not centred on 0, for 2 more bytes per group.

Values must be finite and within fp16 range (|x| < 65504): scales and offsets are fp16.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def _round_fp16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x (float32) to fp16, rounded towards +inf (direction > 0) or -inf (direction < 0)."""
    h = x.to(torch.float16)
    if direction > 0:
        wrong = h.float() < x
        toward = torch.full_like(h, float("inf"))
    else:
        wrong = h.float() > x
        toward = torch.full_like(h, float("-inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., D] float -> [..., G, group_size] float32, zero-padded along D."""
    dim = x.shape[-1]
    pad = (-dim) % group_size
    x = x.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quantize(
    x: torch.Tensor, bits: int, group_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [..., D] per group of `group_size` along the last dim.

    bits=8 -> (codes int8 [..., Dp], scales fp16 [..., G])
    bits=4 -> (packed uint8 [..., Dp/2], scales fp16 [..., G], offsets fp16 [..., G])
    where Dp = G * group_size is D rounded up to a multiple of group_size.
    Max abs error per group: scales / 2 (see the module docstring).
    Raises ValueError for non-finite values or values beyond the fp16 range.
    """
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits} (use 4 or 8)")
    if group_size <= 0 or (bits == 4 and group_size % 2):
        raise ValueError(f"bad group size {group_size}")
    g = _groups(x, group_size)  # [..., G, S]
    if g.numel() and not bool(torch.isfinite(g).all()):
        raise ValueError("cannot quantize non-finite values (NaN or inf in the cache)")
    if g.numel() and float(g.abs().max()) >= FP16_MAX:
        raise ValueError(f"cannot quantize values beyond the fp16 range ({float(g.abs().max()):.3g})")
    if bits == 8:
        absmax = g.abs().amax(-1)  # [..., G]
        scale = _round_fp16(absmax / 127.0, +1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q.reshape(*q.shape[:-2], q.shape[-2] * group_size), scale
    low = _round_fp16(g.amin(-1), -1)  # [..., G] fp16, <= min
    scale = _round_fp16((g.amax(-1) - low.float()) / 15.0, +1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # Tiny fp32 slack in the covering argument: recheck and widen the step if needed.
    short = low.float() + 15.0 * scale.float() < g.amax(-1)
    if bool(short.any()):
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("cannot quantize: group range beyond the fp16 range")
    q = torch.round((g - low.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*q.shape[:-2], q.shape[-2] * group_size)  # [..., Dp]
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed.contiguous(), scale, low


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int = 32,
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize`: [..., dim] in `dtype` (dim defaults to the padded width).

    bits=8: x = codes * scale. bits=4: x = code * scale + offset (`zeros` = the fp16 offsets).
    """
    if bits == 8:
        q = packed.to(torch.float32)
    elif bits == 4:
        if zeros is None:
            raise ValueError("int4 needs its offsets")
        low = (packed & 0x0F).to(torch.float32)
        high = (packed >> 4).to(torch.float32)
        q = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    else:
        raise ValueError(f"unsupported bit width {bits} (use 4 or 8)")
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size) * scales.float().unsqueeze(-1)
    if bits == 4:
        g = g + zeros.float().unsqueeze(-1)
    x = g.reshape(*g.shape[:-2], g.shape[-2] * group_size)
    if dim is not None:
        x = x[..., :dim]
    return x.to(dtype)
