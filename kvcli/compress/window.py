"""Observation-window attention: what the scorers observe, on the fastest path available.

softmax(window queries x keys) reduced over the queries and the query heads of each KV
group. On CUDA the Triton kernel streams it without materializing the W x T matrix; the
torch path below does the same in blocks of queries so KVzip's long probes stay bounded.
"""

from __future__ import annotations

import torch

# Queries per block on the torch path: 256 x 8K keys x fp32 = 8 MiB per head at a time.
QUERY_BLOCK = 256


def window_attention_torch(queries: torch.Tensor, keys: torch.Tensor, scale: float, causal_offset: int, reduce: str,
                           columns: int | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """queries [Hq, W, D], keys [Hkv, T, D] -> [Hkv, T] fp32 (or [Hkv, columns]).

    Query i sees keys 0..causal_offset+i. reduce="sum": sum over queries, mean over the
    group (SnapKV / Ada-KV); reduce="max": max over both (KVzip). columns: score only the
    first `columns` keys (<= causal_offset: keys every query sees); the others still count
    in each query's softmax. A probe scores the prompt's rows, not its own.

    Per block of queries only the keys the block can see are multiplied, and only the
    block's own causal triangle is masked; probabilities come from the log-sum-exp
    (max_i p_ij = exp(max_i (s_ij - lse_i))) instead of a full softmax: on the CPU the
    masking and normalising passes over [Hq, w, T] cost as much as the matmul itself.
    The logits' matmul runs in the reading's precision (bfloat16 under autocast: AMX), the
    softmax statistics in float32, as the reference implementations do in bfloat16.
    lse: each query's log-sum-exp over these keys [Hq, W] when the caller has it already
    (`split_attention`); else it comes from the fused kernel, or from the logits.
    """
    dtype = matmul_dtype(keys)  # before autocast is turned off for the float32 statistics
    with torch.autocast(keys.device.type, enabled=False):
        return _window_attention_torch(queries, keys, scale, causal_offset, reduce, dtype, columns, lse)


def matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the reading's matmuls run in: autocast's where it is on, else the tensor's (float32 for other dtypes)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype if tensor.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _window_attention_torch(queries, keys, scale, causal_offset, reduce, dtype, columns, lse) -> torch.Tensor:
    num_q_heads, window, _ = queries.shape
    num_kv_heads, length, _ = keys.shape
    group = num_q_heads // num_kv_heads
    if columns is not None and not 0 <= columns <= min(causal_offset, length):
        raise ValueError(f"columns={columns} must be keys every query sees (at most {min(causal_offset, length)})")
    keys_m = keys.to(dtype).repeat_interleave(group, dim=0)  # [Hq, T, D]
    if lse is None:
        lse = _fused_logsumexp(queries.to(dtype), keys_m, scale, causal_offset)  # [Hq, W] or None
    # With the log-sum-exp known, only the scored columns need logits; else every seen one.
    scored = columns if columns is not None and lse is not None else length
    out = torch.zeros(num_q_heads, scored, dtype=torch.float32, device=keys.device)
    for start in range(0, window, QUERY_BLOCK):
        q = queries[:, start : start + QUERY_BLOCK].to(dtype)  # [Hq, w, D]
        rows = q.shape[1]
        seen = min(causal_offset + start + rows, scored)  # keys the block's last query sees
        logits = torch.matmul(q, keys_m[:, :seen].transpose(1, 2)).float().mul_(scale)  # [Hq, w, seen]
        first = causal_offset + start  # first key not every query of the block sees
        if first + 1 < seen:
            logits[:, :, first + 1 :].masked_fill_(_future(rows, seen - first - 1, keys.device), float("-inf"))
        # log-probabilities
        logits -= logits.logsumexp(dim=-1, keepdim=True) if lse is None else lse[:, start : start + rows, None]
        if reduce == "max":
            out[:, :seen] = torch.maximum(out[:, :seen], logits.amax(dim=1).exp())
        else:
            out[:, :seen] += logits.exp_().sum(dim=1)
    out = out[:, :columns].reshape(num_kv_heads, group, -1)
    return out.amax(dim=1) if reduce == "max" else out.mean(dim=1)


# The CPU's fused attention kernel, which also returns each query's log-sum-exp: one tiled
# pass instead of an exp over the whole [Hq, W, T] logits (4x faster for KVzip's probes).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_logsumexp(queries, keys, scale, causal_offset) -> torch.Tensor | None:
    """[Hq, W] log-sum-exp of each query's scaled logits over the keys it sees, from the
    fused CPU kernel; None where it is missing or refuses (the caller computes it then)."""
    if _CPU_FLASH is None or queries.device.type != "cpu":
        return None
    window, length = queries.shape[1], keys.shape[1]
    hidden = torch.arange(length).unsqueeze(0) > causal_offset + torch.arange(window).unsqueeze(1)
    mask = torch.zeros(window, length, dtype=queries.dtype).masked_fill_(hidden, float("-inf"))
    try:
        _, lse = _CPU_FLASH(queries.unsqueeze(0), keys.unsqueeze(0), keys.unsqueeze(0), 0.0, False, attn_mask=mask, scale=scale)[:2]
    except RuntimeError:
        return None
    return lse[0].float()


def split_attention(query: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor, bool]], scale: float):
    """Attention of query [1, Hq, n, D] over the union of `pieces`, one fused CPU call each.

    pieces: (keys, values [1, Hkv, S, D], causal); a causal piece is the queries' own keys
    (square, query i sees keys 0..i), the others are seen whole. The calls are merged by
    their log-sum-exp, so the result is the attention over all keys at once, and each
    piece's log-sum-exp [1, Hq, n] (float32) comes with it: KVzip's scoring softmax runs over
    a subset of a probe's keys ([its chunk][sinks][the probe]), whose log-sum-exp would
    otherwise cost one more fused call over them. The causal piece alone skips its upper
    triangle, where one masked call cannot.

    Returns (out [1, Hq, n, D] in the reading's matmul dtype, [lse per piece]), or None off
    the CPU or where the kernel refuses (the caller attends as before).
    """
    if _CPU_FLASH is None or query.device.type != "cpu":
        return None
    dtype = matmul_dtype(query)
    q = query.to(dtype)
    outs, lses = [], []
    with torch.autocast("cpu", enabled=False):
        try:
            for keys, values, causal in pieces:
                if keys.shape[2] == 0:
                    lses.append(torch.full(query.shape[:3], float("-inf"), device=query.device))
                    continue
                # the kernel maps query head i to KV head i // group itself (GQA): no copies
                out, lse = _CPU_FLASH(q, keys.to(dtype), values.to(dtype), 0.0, causal, scale=scale)[:2]
                outs.append((out, lse))
                lses.append(lse.float())
        except RuntimeError:
            return None
        total = torch.logsumexp(torch.stack(lses), dim=0)  # [1, Hq, n]
        merged = sum(out.float() * (lse.float() - total).exp().unsqueeze(-1) for out, lse in outs)
    return merged.to(dtype), lses


def _future(rows: int, columns: int, device) -> torch.Tensor:
    """[rows, columns] bool: query r of a block must not see column c (key first + 1 + c) when c >= r."""
    return torch.arange(columns, device=device).unsqueeze(0) >= torch.arange(rows, device=device).unsqueeze(1)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, causal_offset: int, reduce: str,
                     columns: int | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    if queries.is_cuda:
        from kvcli.kernels import window_scores

        return window_scores.window_scores(queries, keys, scale, causal_offset, reduce)[:, :columns]
    return window_attention_torch(queries, keys, scale, causal_offset, reduce, columns, lse)


def window_probabilities(queries: torch.Tensor, keys: torch.Tensor, scale: float, causal_offset: int) -> torch.Tensor:
    """queries [Hq, W, D], keys [Hkv, T, D] -> softmax attention [Hq, W, T] fp32, unreduced.

    What scorers that aggregate per query row (DefensiveKV) observe. W is a window (tens of
    tokens), so the [Hq, W, T] result is the size of a few rows of keys.
    """
    num_q_heads, window, _ = queries.shape
    group = num_q_heads // keys.shape[0]
    logits = torch.matmul(queries.float(), keys.float().repeat_interleave(group, dim=0).transpose(1, 2)) * scale
    columns = torch.arange(keys.shape[1], device=keys.device)
    limit = causal_offset + torch.arange(window, device=keys.device)
    return logits.masked_fill(columns.unsqueeze(0) > limit.unsqueeze(1), float("-inf")).softmax(dim=-1)
