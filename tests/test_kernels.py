"""Triton kernels (kvcli.kernels) against their plain torch references.

Without a CUDA device the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must
be set before any kernel module is imported (@triton.jit reads it), hence the top of this
file (tests/conftest.py should do the same, so that test order never matters).
With CUDA the same cases run on the GPU, plus larger ones (GPU_ONLY).

Error bounds: relative RMS, ||out - ref|| / ||ref||, per dtype (ERR_* below). The
interpreter's tl.dot is wrong for bf16 operands, so under the interpreter the kernels
upcast bf16 tiles to fp32 before tl.dot (after rounding P to bf16, as on the GPU); bf16
is therefore tested everywhere, but the real bf16 tensor-core path only on CUDA.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvcli.kernels import interpreting, triton_available  # noqa: E402
from kvcli.kernels.decode_attention import (  # noqa: E402
    PROGRAMS_PER_SM,
    choose_splits,
    decode_attention,
    decode_attention_reference,
    make_cache,
    skewed_lengths,
)
from kvcli.kernels.window_scores import window_scores, window_scores_reference  # noqa: E402

from kvcli.cache import attend_reference  # noqa: E402
from kvcli.compress.window import window_attention_torch  # noqa: E402
from tests.support import layer_from_kept

DEVICE = "cpu" if interpreting() else "cuda"
GPU = DEVICE == "cuda"
GPU_ONLY = pytest.mark.skipif(not GPU, reason="large shapes: CUDA only (too slow in the interpreter)")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# relative RMS bounds. decode output is rounded to the input dtype (bf16: 8 bits of mantissa)
ERR_ATTN = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# window scores are fp32; 16-bit inputs give exact products accumulated in fp32
ERR_SCORES = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-30)).item()


def test_triton_available():
    assert triton_available(DEVICE)
    if interpreting():
        assert triton_available("cpu")


# --------------------------------------------------------------------------- decode attention

# per (B=2, Hkv=3): 0, 1, a non-multiple of the 64-row block, > 2 blocks, mixed
DECODE_LENGTHS = [[0, 1, 37], [150, 64, 200]]


def _decode_case(batch, lengths, num_kv_heads, group, head_dim, n, dtype, headroom=7):
    lengths = torch.tensor(lengths, dtype=torch.int32)
    keys, values, offsets = make_cache(batch, lengths, head_dim, headroom, dtype, DEVICE)
    q = torch.randn(batch, num_kv_heads * group, n, head_dim, dtype=dtype, device=DEVICE)
    return q, keys, values, offsets, lengths.to(DEVICE)


# split-K path (3 chunks + combine) and single-chunk path; fp16 only single-chunk (time)
DTYPE_SPLITS = [("fp32", 1), ("fp32", 3), ("fp16", 1), ("bf16", 1), ("bf16", 3)]


@pytest.mark.parametrize(
    "dtype,splits", [(DTYPES[d], s) for d, s in DTYPE_SPLITS], ids=[f"{d}-splits{s}" for d, s in DTYPE_SPLITS]
)
@pytest.mark.parametrize("n", [1, 3, 16], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"G{g}")
def test_decode_attention(group, head_dim, n, dtype, splits):
    torch.manual_seed(1000 * group + head_dim + 10 * n + splits)
    q, keys, values, offsets, lengths = _decode_case(2, DECODE_LENGTHS, 3, group, head_dim, n, dtype)
    scale = head_dim**-0.5
    out = decode_attention(q, keys, values, offsets, lengths, scale, num_splits=splits)
    ref = decode_attention_reference(q, keys, values, offsets, lengths, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert (out[0, :group] == 0).all()  # length-0 head: zeros, not NaN
    assert rel_rms(out, ref) < ERR_ATTN[dtype]


@pytest.mark.parametrize(
    "batch,num_kv_heads,group,head_dim,n",
    [(1, 2, 2, 64, 256), (2, 1, 8, 32, 40), (1, 2, 3, 96, 5)],
    ids=["B1-Hkv2-G2-D64-n256", "B2-Hkv1-G8-D32-n40", "B1-Hkv2-G3-D96-n5"],
)
def test_decode_attention_many_queries_odd_shapes(batch, num_kv_heads, group, head_dim, n):
    """n up to 256 (a question prefilled over the cache: several row blocks), G*n > 64,
    a non-power-of-two group and head_dim."""
    torch.manual_seed(7)
    lengths = torch.randint(n, n + 300, (batch, num_kv_heads)).tolist()
    q, keys, values, offsets, lengths = _decode_case(batch, lengths, num_kv_heads, group, head_dim, n, torch.float32)
    for splits in (1, 4):
        out = decode_attention(q, keys, values, offsets, lengths, 0.1, num_splits=splits)
        ref = decode_attention_reference(q, keys, values, offsets, lengths, 0.1)
        assert rel_rms(out, ref) < ERR_ATTN[torch.float32], splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 3], ids=lambda n: f"n{n}")
def test_decode_attention_matches_cache_attend_reference(n, dtype):
    """Against kvcli.cache.attend_reference on a real LayerCache: tests.support.layer_from_kept + append."""
    torch.manual_seed(11 + n)
    num_kv_heads, group, head_dim, length = 2, 4, 64, 90
    src_k = torch.randn(num_kv_heads, length, head_dim, dtype=dtype, device=DEVICE)
    src_v = torch.randn_like(src_k)
    kept = [torch.randperm(length)[:c].sort().values for c in (5, 71)]
    layer = layer_from_kept(src_k, src_v, torch.arange(length), kept, headroom=8).repeat(2)
    new = torch.randn(2, num_kv_heads, n, head_dim, dtype=dtype, device=DEVICE)
    layer.append(new, torch.randn_like(new), torch.arange(length, length + n, device=DEVICE).expand(2, n))
    q = torch.randn(2, num_kv_heads * group, n, head_dim, dtype=dtype, device=DEVICE)
    ref = attend_reference(layer, q, 0.125)
    for splits in (1, 2):
        out = decode_attention(q, layer.keys, layer.values, layer.offsets, layer.lengths, 0.125, num_splits=splits)
        assert rel_rms(out, ref) < ERR_ATTN[dtype]
    ours = decode_attention_reference(q, layer.keys, layer.values, layer.offsets, layer.lengths, 0.125)
    assert rel_rms(ours, ref) < 1e-6


def test_decode_attention_noncontiguous_query_and_lengths_below_n():
    """q as transformers hands it ([B, n, Hq, D] transposed); heads shorter than n: the
    queries that see no key give zeros, the others are still right."""
    torch.manual_seed(3)
    n, group, head_dim = 4, 2, 64
    q_bnhd = torch.randn(2, n, 2 * group, head_dim, device=DEVICE)
    q = q_bnhd.transpose(1, 2)
    assert not q.is_contiguous()
    lengths = [[2, 0], [3, 130]]
    _, keys, values, offsets, lengths = _decode_case(2, lengths, 2, group, head_dim, n, torch.float32)
    for splits in (1, 3):
        out = decode_attention(q, keys, values, offsets, lengths, 0.125, num_splits=splits)
        ref = decode_attention_reference(q, keys, values, offsets, lengths, 0.125)
        assert torch.isfinite(out).all()
        assert (out[0, :group, :2] == 0).all()  # length 2, n 4: queries 0 and 1 see nothing
        assert rel_rms(out, ref) < ERR_ATTN[torch.float32]


def test_decode_attention_heuristic_splits_and_error_detection():
    """The default split heuristic on skewed lengths; and the check bites: a wrong scale fails."""
    torch.manual_seed(5)
    lengths = skewed_lengths(4, 300 if not GPU else 6000).view(1, 4).tolist()
    q, keys, values, offsets, lengths = _decode_case(1, lengths, 4, 2, 64, 2, torch.float32)
    out = decode_attention(q, keys, values, offsets, lengths, 0.125)
    ref = decode_attention_reference(q, keys, values, offsets, lengths, 0.125)
    assert rel_rms(out, ref) < ERR_ATTN[torch.float32]
    wrong = decode_attention(q, keys, values, offsets, lengths, 0.13)
    assert rel_rms(wrong, ref) > 100 * ERR_ATTN[torch.float32]


@pytest.mark.parametrize("mean", [4096, 13107, 131072])
@pytest.mark.parametrize("programs_per_sm", [None, 2, 8])
def test_split_plan_from_the_rows_held_gives_each_sm_its_programs(mean, programs_per_sm):
    """Chunks are sized from the rows held, so the programs with work are about
    programs_per_sm per SM whatever the skew (sizing from the longest head, the plan before,
    gave ~2 at any length); every head is covered; chunks are whole blocks. None: the default."""
    torch.manual_seed(mean)
    lengths = skewed_lengths(8, mean).tolist()
    max_length, total = max(lengths) + 512, sum(lengths) + 8 * 512  # segments with decode's headroom
    if programs_per_sm is None:
        splits, chunk = choose_splits(max_length, total, 64, 132)
        programs_per_sm = PROGRAMS_PER_SM
    else:
        splits, chunk = choose_splits(max_length, total, 64, 132, programs_per_sm)
    assert chunk % 64 == 0 and splits * chunk >= max_length
    working = sum(-(-length // chunk) for length in lengths)
    target = programs_per_sm * 132
    assert 0.5 * target <= working <= target + 8 or chunk == 64, (working, target)


@pytest.mark.parametrize("combine_columns", [16, 32, 128])
def test_decode_attention_combine_column_blocks(combine_columns):
    """The combine merges the splits in column blocks of any width up to D: same answer."""
    torch.manual_seed(6)
    lengths = skewed_lengths(4, 300).view(1, 4).tolist()
    q, keys, values, offsets, lengths = _decode_case(1, lengths, 4, 2, 64, 1, torch.float32)
    out = decode_attention(q, keys, values, offsets, lengths, 0.125, num_splits=7, combine_columns=combine_columns)
    ref = decode_attention_reference(q, keys, values, offsets, lengths, 0.125)
    assert rel_rms(out, ref) < ERR_ATTN[torch.float32]


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [1, 4, 16], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mean", [2048, 20000], ids=lambda m: f"mean{m}")
def test_decode_attention_large_gpu(mean, n, dtype):
    torch.manual_seed(mean + n)
    lengths = torch.stack([skewed_lengths(8, mean) for _ in range(2)]).tolist()
    q, keys, values, offsets, lengths = _decode_case(2, lengths, 8, 4, 128, n, dtype, headroom=512)
    out = decode_attention(q, keys, values, offsets, lengths, 128**-0.5)
    ref = decode_attention_reference(q, keys, values, offsets, lengths, 128**-0.5)
    assert rel_rms(out, ref) < ERR_ATTN[dtype]


# --------------------------------------------------------------------------- window scores

# (W, T, causal_offset): window = last W tokens (non-multiple of 64); window in the
# middle (keys after the window are seen by nobody: score 0); W*G > 64 rows; offset 0
WINDOWS = [(5, 150, 145), (40, 120, 60), (3, 70, 0)]


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("window,length,offset", WINDOWS, ids=[f"W{w}-T{t}-off{o}" for w, t, o in WINDOWS])
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"G{g}")
def test_window_scores(group, head_dim, window, length, offset, dtype, reduce):
    torch.manual_seed(group * 100 + head_dim + window)
    num_kv_heads = 2
    q = torch.randn(num_kv_heads * group, window, head_dim, dtype=dtype, device=DEVICE)
    keys = torch.randn(num_kv_heads, length, head_dim, dtype=dtype, device=DEVICE)
    ref = window_scores_reference(q, keys, head_dim**-0.5, offset, reduce)
    for splits in (None, 3):  # pass 1 in one key chunk / in 3 chunks merged by logsumexp
        out = window_scores(q, keys, head_dim**-0.5, offset, reduce, num_splits=splits)
        assert out.shape == (num_kv_heads, length) and out.dtype == torch.float32
        assert rel_rms(out, ref) < ERR_SCORES[dtype], splits
    assert (out[:, offset + window :] == 0).all()
    if reduce == "sum":  # every query's probabilities sum to 1, averaged over the group
        torch.testing.assert_close(out.sum(1).double(), torch.full((num_kv_heads,), float(window), dtype=torch.float64, device=DEVICE), rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_window_scores_matches_kvcli_window(reduce):
    """Same semantics as kvcli.compress.window.window_attention_torch (the CPU path)."""
    torch.manual_seed(2)
    q = torch.randn(8, 9, 64, device=DEVICE)
    keys = torch.randn(2, 120, 64, device=DEVICE)
    out = window_scores(q, keys, 0.125, 111, reduce)
    assert rel_rms(out, window_attention_torch(q, keys, 0.125, 111, reduce)) < 1e-5
    assert rel_rms(window_scores(q, keys, 0.2, 111, reduce), out) > 1e-2  # the check bites


@GPU_ONLY
@pytest.mark.parametrize("length,window,reduce", [(8192, 32, "sum"), (4096, 1024, "max"), (30000, 64, "sum")])
def test_window_scores_large_gpu(length, window, reduce):
    torch.manual_seed(length)
    q = torch.randn(32, window, 128, dtype=torch.bfloat16, device=DEVICE)
    keys = torch.randn(8, length, 128, dtype=torch.bfloat16, device=DEVICE)
    out = window_scores(q, keys, 128**-0.5, length - window, reduce)
    ref = window_scores_reference(q, keys, 128**-0.5, length - window, reduce)
    assert rel_rms(out, ref) < ERR_SCORES[torch.bfloat16]


# --------------------------------------------------------------------------- fused decode-step ops


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 64), (5, 1000)], ids=["R1-H576", "R3-H64", "R5-H1000"])
def test_rms_norm_matches_reference(rows, hidden, dtype):
    from kvcli.kernels.rms_norm import rms_norm, rms_norm_reference

    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype) * 3
    weight = torch.randn(hidden, device=DEVICE, dtype=dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_rms(out, rms_norm_reference(x, weight, 1e-5)) < ERR_ATTN[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("rows,inner", [(1, 1536), (4, 100)], ids=["R1-I1536", "R4-I100"])
def test_silu_mul_matches_reference(rows, inner, dtype):
    from kvcli.kernels.silu_mul import silu_mul, silu_mul_reference

    gate_up = torch.randn(rows, 2 * inner, device=DEVICE, dtype=dtype) * 4
    out = silu_mul(gate_up)
    assert out.shape == (rows, inner)
    assert rel_rms(out, silu_mul_reference(gate_up)) < ERR_ATTN[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "batch,n,num_q,num_kv,head_dim",
    [(1, 1, 4, 4, 64), (2, 3, 8, 2, 64), (1, 2, 8, 1, 128)],
    ids=["B1-n1-G1-D64", "B2-n3-G4-D64", "B1-n2-G8-D128"],
)
def test_rope_append_matches_reference(batch, n, num_q, num_kv, head_dim, dtype):
    from kvcli.kernels.rope_append import rope_append, rope_append_reference

    gen = torch.Generator().manual_seed(batch * 100 + n)
    qkv = torch.randn(batch * n, (num_q + 2 * num_kv) * head_dim, generator=gen).to(DEVICE, dtype)
    angle = torch.randn(batch * n, head_dim // 2, generator=gen) * 5
    cos = torch.cat([angle.cos()] * 2, -1).to(DEVICE, dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(DEVICE, dtype)
    lengths = torch.randint(0, 7, (batch, num_kv), generator=gen, dtype=torch.int32).to(DEVICE)  # rows already in use
    cache_keys, cache_values, offsets = make_cache(batch, lengths.cpu(), head_dim, headroom=n + 2, dtype=dtype, device=DEVICE)
    cache_positions = torch.full(cache_keys.shape[:2], -1, dtype=torch.int32, device=DEVICE)
    token_positions = (torch.arange(n) + 40).expand(batch, n).contiguous().to(DEVICE)
    states = []
    for fn in (rope_append, rope_append_reference):
        keys, values = cache_keys.clone(), cache_values.clone()
        positions, used = cache_positions.clone(), lengths.clone()
        q = fn(qkv, cos, sin, keys, values, positions, offsets, used, token_positions, num_q)
        states.append((q, keys, values, positions, used))
    (q, keys, values, positions, used), (q_ref, keys_ref, values_ref, positions_ref, used_ref) = states
    assert q.shape == (batch, num_q, n, head_dim)
    assert rel_rms(q, q_ref) < ERR_ATTN[dtype]
    assert rel_rms(keys, keys_ref) < ERR_ATTN[dtype]
    assert torch.equal(values, values_ref)  # a copy: exact
    assert torch.equal(positions, positions_ref)
    assert torch.equal(used, lengths + n) and torch.equal(used_ref, used)
