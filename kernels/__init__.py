"""Triton kernels for kvcli's compressed, variable-length KV cache (shipped as `kvcli.kernels`).

- `decode_attention`  (decode_attention.py): flash-decoding over the flat per-head layout of
  `kvcli.cache.LayerCache` (every (sequence, KV head) has its own length, GQA groups read
  their KV segment once, n causal queries per step, split-K + combine).
- `window_scores`     (window_scores.py): SnapKV / Ada-KV / KVzip observation-window scores,
  softmax over keys then sum (mean over the GQA group) or max over queries and group,
  two passes (log-sum-exp, then scores) without materialising the W x T matrix.

Each module holds a plain torch reference next to its kernel, and a `benchmark()` run by
`python -m kvcli.kernels.<module>` on a GPU.

Triton's CPU interpreter (`TRITON_INTERPRET=1`, CPU tensors) must be switched on *before*
any kernel module is imported (the @triton.jit decorator reads it).
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when triton imports and kernels can run for tensors on `device`:
    a CUDA device, or any device when TRITON_INTERPRET=1 (CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    if interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


__all__ = ["interpreting", "triton_available"]
