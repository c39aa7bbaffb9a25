"""The torch path of the observers' attention (kvcli.compress.window) against a dense softmax."""

import pytest
import torch

from kvcli.compress import window
from kvcli.compress.window import QUERY_BLOCK, split_attention, window_attention_torch


def dense(queries, keys, scale, offset, reduce):
    """Every probability of [Hq, W, T] written out, then reduced: the definition."""
    group = queries.shape[0] // keys.shape[0]
    logits = queries.double() @ keys.double().repeat_interleave(group, 0).transpose(1, 2) * scale
    visible = torch.arange(keys.shape[1])[None] <= offset + torch.arange(queries.shape[1])[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).view(keys.shape[0], group, queries.shape[1], -1)
    return probs.amax(dim=(1, 2)) if reduce == "max" else probs.sum(2).mean(1)


# (W, T, offset): several query blocks with a partial last one; the window in the middle of
# the keys (later keys unseen); one query; a window as long as the keys
SHAPES = [(QUERY_BLOCK * 2 + 37, QUERY_BLOCK * 3, QUERY_BLOCK - 37), (40, 300, 100), (1, 50, 49), (70, 70, 0)]


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"W{w}-T{t}-off{o}" for w, t, o in SHAPES])
def test_matches_the_dense_softmax(shape, reduce):
    w, t, offset = shape
    torch.manual_seed(w + t)
    queries, keys = torch.randn(6, w, 16), torch.randn(2, t, 16)
    got = window_attention_torch(queries, keys, 0.3, offset, reduce)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense(queries, keys, 0.3, offset, reduce), rtol=1e-5, atol=1e-7)
    assert (got[:, offset + w :] == 0).all()  # keys after the last query: seen by nobody


def test_under_autocast_the_matmul_runs_in_bfloat16_and_the_softmax_in_float32(monkeypatch):
    torch.manual_seed(0)
    queries, keys = torch.randn(6, 300, 64), torch.randn(2, 900, 64)
    exact = dense(queries, keys, 0.125, 600, "max")
    dtypes = []
    real = torch.matmul
    monkeypatch.setattr(window.torch, "matmul", lambda a, b: dtypes.append(a.dtype) or real(a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = window_attention_torch(queries, keys, 0.125, 600, "max")
    assert set(dtypes) == {torch.bfloat16} and got.dtype == torch.float32
    error = ((got.double() - exact).abs() / exact).median()
    assert 1e-5 < error < 1e-2  # bfloat16 logits: close, not exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_log_sum_exp_is_used_on_the_cpu_and_matches(dtype):
    torch.manual_seed(1)
    queries, keys = torch.randn(6, 40, 32, dtype=dtype), torch.randn(6, 100, 32, dtype=dtype)
    lse = window._fused_logsumexp(queries, keys, 0.2, 60)
    assert lse is not None and lse.shape == (6, 40) and lse.dtype == torch.float32
    logits = queries.float() @ keys.float().transpose(1, 2) * 0.2
    visible = torch.arange(100)[None] <= 60 + torch.arange(40)[:, None]
    expected = logits.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected, rtol=1e-4, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_scoring_only_the_first_columns_is_the_same_as_slicing(reduce, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(window, "_CPU_FLASH", None)
    torch.manual_seed(3)
    queries, keys = torch.randn(6, QUERY_BLOCK + 20, 16), torch.randn(2, 700, 16)
    whole = window_attention_torch(queries, keys, 0.3, 700 - QUERY_BLOCK - 20, reduce)
    part = window_attention_torch(queries, keys, 0.3, 700 - QUERY_BLOCK - 20, reduce, columns=300)
    assert part.shape == (2, 300)
    torch.testing.assert_close(part, whole[:, :300], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="columns"):
        window_attention_torch(queries, keys, 0.3, 200, reduce, columns=201)  # query 0 sees only 201 keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_attention_is_one_attention_over_all_keys(dtype):
    """Pieces [seen whole][the queries' own keys, causal][seen whole] merged by their
    log-sum-exp = one masked attention over every key; the log-sum-exps combine to the whole's."""
    torch.manual_seed(3)
    n, d = 37, 16
    query = torch.randn(1, 6, n, d)
    pieces = [(torch.randn(1, 2, s, d), torch.randn(1, 2, s, d)) for s in (50, n, 23)]
    causal = [False, True, False]
    got, lses = split_attention(query.to(dtype), [(k.to(dtype), v.to(dtype), c) for (k, v), c in zip(pieces, causal)], 0.25)
    keys = torch.cat([k for k, _ in pieces], dim=2).repeat_interleave(3, dim=1)
    values = torch.cat([v for _, v in pieces], dim=2).repeat_interleave(3, dim=1)
    logits = query.double() @ keys.double().transpose(-1, -2) * 0.25  # [1, 6, n, 110]
    hidden = torch.zeros(n, keys.shape[2], dtype=torch.bool)
    hidden[:, 50 : 50 + n] = torch.ones(n, n, dtype=torch.bool).triu(1)
    logits = logits.masked_fill(hidden, float("-inf"))
    want = logits.softmax(-1) @ values.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(torch.logsumexp(torch.stack(lses), 0).double(), logits.logsumexp(-1), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lses[1].double(), logits[..., 50 : 50 + n].logsumexp(-1), atol=tolerance, rtol=tolerance)
