"""The compressed cache against plain transformers and against obviously-correct re-implementations."""


import pytest
import torch
import torch.nn.functional as F

from kvcli.cache import LayerCache, attend_reference
from kvcli.compress.budgets import CrossLayerPolicy, Policy, layer_budgets, select_ada
from kvcli.compress.methods import make_press
from kvcli.compress.pipeline import prefill
from kvcli.generate import decode, forward
from kvcli.prompts import PromptLayout
from tests.support import layer_from_kept, tiny_llama

DOCUMENT = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike. " * 6
QUESTION = "Which word follows golf?"


def doc_kept(layer: LayerCache, layout: PromptLayout) -> list[set[int]]:
    """Document positions kept per head of one layer."""
    start, stop = layout.document_range
    out = []
    for h in range(layer.num_kv_heads):
        positions = layer.head_rows(0, h)[2].tolist()
        out.append({p for p in positions if start <= p < stop})
    return out


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["MHA", "GQA4"])
@pytest.mark.parametrize("chunk", [4096, 37], ids=["one-chunk", "chunked"])
def test_full_cache_matches_transformers(heads, chunk, char_tokenizer):
    reference, ours = tiny_llama(*heads)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    ids = torch.tensor([layout.all_ids])
    result = prefill(ours, layout, make_press("full"), chunk_size=chunk)
    with torch.no_grad():
        expected = reference(ids).logits[0, -1]
    # fp32 on CPU: differences are reduction-order rounding only.
    torch.testing.assert_close(result.last_logits, expected, atol=1e-4, rtol=1e-4)
    # one more token through the compressed-cache decode path
    nxt = torch.tensor([[7]])
    step = forward(ours, result.cache, nxt)
    with torch.no_grad():
        expected = reference(torch.cat([ids, nxt], 1)).logits[0, -1]
    torch.testing.assert_close(step[0], expected, atol=1e-4, rtol=1e-4)


def test_full_cache_same_greedy_answer_as_generate(char_tokenizer):
    reference, ours = tiny_llama(8, 2)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    ids = torch.tensor([layout.all_ids])
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1] :]
    result = prefill(ours, layout, make_press("full"))
    tokens = decode(ours, result.cache, result.last_logits[None], max_new_tokens=12, stop_ids=set())
    assert tokens[0] == expected.tolist()


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["MHA", "GQA4"])
def test_snapkv_matches_naive_attention_weights(heads, char_tokenizer):
    """Kept set == top-k of pooled, explicitly computed window attention (eager weights)."""
    reference, ours = tiny_llama(*heads)
    reference.set_attn_implementation("eager")
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    press = make_press("snapkv", ratio=0.3)
    result = prefill(ours, layout, press)
    with torch.no_grad():
        attentions = reference(torch.tensor([layout.all_ids]), output_attentions=True).attentions
    start, stop = layout.document_range
    window = press.scorer.window(layout)
    budget = round(0.3 * (stop - start))
    group = heads[0] // heads[1]
    for layer_idx, weights in enumerate(attentions):
        votes = weights[0, :, -window:, :].sum(dim=1)  # [Hq, N]: sum over the window
        votes = votes.view(heads[1], group, -1).mean(dim=1)[:, start:stop]  # mean over the group
        pooled = F.avg_pool1d(votes[:, None], 7, stride=1, padding=3, count_include_pad=False)[:, 0]
        expected = [set((pooled[h].topk(budget).indices + start).tolist()) for h in range(heads[1])]
        assert doc_kept(result.cache.layers[layer_idx], layout) == expected


def test_uniform_and_pyramid_budgets():
    scores = torch.rand(4, 200)
    kept = Policy("uniform", "uniform").select(0, 8, scores, 50)
    assert [len(k) for k in kept] == [50] * 4
    schedule = layer_budgets("pyramid", 50, 8, 200)
    assert schedule == sorted(schedule, reverse=True) and schedule[0] > 50 > schedule[-1]
    assert abs(sum(schedule) / 8 - 50) <= 1


def test_ada_floor_and_total():
    torch.manual_seed(0)
    scores = torch.rand(4, 300)
    scores[0] *= 100  # head 0 is far more confident: Ada-KV hands it budget
    kept = select_ada(scores, 40, alpha=0.2)
    counts = [len(k) for k in kept]
    assert sum(counts) == 4 * 40
    assert min(counts) >= 8  # the floor: 20% of 40
    assert counts[0] > 40
    # Ada-KV's choice beyond the floor is one top-k over all heads: every token kept beyond
    # its head's floor scores at least as high as every token any head dropped
    floor = int(0.2 * 40)
    extra_min, dropped_max = float("inf"), float("-inf")
    for h, k in enumerate(kept):
        own_floor = set(scores[h].topk(floor).indices.tolist())
        kept_set = set(k.tolist())
        beyond = [scores[h, i].item() for i in kept_set - own_floor]
        dropped = [scores[h, i].item() for i in range(300) if i not in kept_set]
        extra_min = min([extra_min, *beyond])
        dropped_max = max([dropped_max, *dropped])
    assert extra_min >= dropped_max


def test_dynamic_never_exceeds_layer_maxima(char_tokenizer):
    _, ours = tiny_llama(8, 2, layers=6)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    policy = CrossLayerPolicy("dynamic", max_factor=2.0, interval=2)
    press = make_press("dynamic", ratio=0.2)
    press.policy = policy
    result = prefill(ours, layout, press)
    budget = press.budget_for(len(layout.document_ids))
    kept = torch.tensor(result.layer_kept)
    assert kept.max() <= policy.cap(budget, len(layout.document_ids))
    assert kept.sum() <= round(budget * kept.numel())
    assert kept.sum() >= 0.9 * budget * kept.numel()
    assert len(set(kept.sum(dim=1).tolist())) > 1  # budgets really move between layers


def test_global_threshold_total(char_tokenizer):
    _, ours = tiny_llama(8, 2, layers=4)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    press = make_press("kvzip", ratio=0.2)
    result = prefill(ours, layout, press)
    budget = press.budget_for(len(layout.document_ids))
    kept = torch.tensor(result.layer_kept)
    assert kept.sum() == round(budget * kept.numel())


def test_short_documents_are_not_compressed(char_tokenizer):
    _, ours = tiny_llama(8, 2)
    layout = PromptLayout.build(char_tokenizer, "short text", QUESTION)
    result = prefill(ours, layout, make_press("snapkv", budget=100))
    assert not result.compressed
    assert all(k == len(layout.document_ids) for layer in result.layer_kept for k in layer)


def test_cache_bytes_are_kept_tokens_times_bytes_per_token(char_tokenizer):
    _, ours = tiny_llama(8, 2)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    result = prefill(ours, layout, make_press("ada-snapkv", ratio=0.25), headroom=16)
    cache = result.cache
    head_dim = cache.layers[0].keys.shape[-1]
    kept = sum(int(layer.lengths.sum()) for layer in cache.layers)
    assert cache.nbytes() == kept * head_dim * 2 * 4  # K and V, fp32
    allocated = sum(layer.keys.numel() * 2 * 4 for layer in cache.layers)
    assert allocated == cache.nbytes() + 16 * 2 * len(cache.layers) * head_dim * 2 * 4  # + headroom only
    assert allocated < 0.5 * result.full_bytes


def test_variable_length_attention_reference_against_dense():
    """attend_reference over per-head segments == dense attention over each head's rows."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 50, 16), torch.randn(2, 50, 16)
    kept = [torch.tensor([0, 3, 9, 20, 49]), torch.arange(0, 50, 2)]
    layer = layer_from_kept(keys, values, torch.arange(50), kept, headroom=4)
    new_k, new_v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    layer.append(new_k, new_v, torch.tensor([[50, 51]]))
    query = torch.randn(1, 4, 2, 16)  # 2 query heads per KV head, 2 new tokens
    out = attend_reference(layer, query, 0.25)
    for h in range(2):
        k = torch.cat([keys[h, kept[h]], new_k[0, h]])
        v = torch.cat([values[h, kept[h]], new_v[0, h]])
        for g in range(2):
            q = query[0, 2 * h + g]
            mask = torch.ones(2, len(k), dtype=torch.bool)
            mask[0, -1] = False  # the first new token does not see the second
            expected = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=0.25)[0]
            torch.testing.assert_close(out[0, 2 * h + g], expected)


def test_batch_of_questions_over_one_cache(char_tokenizer):
    """Several agnostic questions decoded as one batch == each decoded alone."""
    _, ours = tiny_llama(8, 2)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    result = prefill(ours, layout, make_press("ada-snapkv", ratio=0.3))
    questions = [layout.question_part(q) for q in ("first?", "a longer second question?")]
    alone = []
    for ids in questions:
        cache = result.cache.clone()
        logits = forward(ours, cache, torch.tensor([ids]))
        alone.append(decode(ours, cache, logits, max_new_tokens=6, stop_ids=set())[0])
    batch = result.cache.repeat(2)
    batch.reserve(64)
    first = torch.cat([forward(ours, batch.sequence(b), torch.tensor([ids])) for b, ids in enumerate(questions)])
    assert decode(ours, batch, first, max_new_tokens=6, stop_ids=set()) == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_replay_decodes_the_same_tokens_as_eager(char_tokenizer, dtype):
    _, ours = tiny_llama(8, 2, layers=4)
    ours.to("cuda", dtype)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    result = prefill(ours, layout, make_press("ada-snapkv", ratio=0.3))
    first = result.last_logits[None]
    eager = decode(ours, result.cache.clone(), first, max_new_tokens=24, stop_ids=set(), cuda_graph=False)
    graphed = decode(ours, result.cache.clone(), first, max_new_tokens=24, stop_ids=set(), cuda_graph=True)
    assert graphed == eager


def test_max_pooling_gives_a_whole_run_its_peak_score():
    """SnapKV with max pooling: the tokens within kernel//2 of a hit share its score, so one
    threshold keeps or drops a digit run whole; average pooling grades them (and cuts runs)."""
    from kvcli.compress.observation import Observation
    from kvcli.compress.scorers import SnapKV

    attention = torch.full((1, 20), 0.01)
    attention[0, 10] = 1.0
    obs = Observation(0, 1, 1, 1, 20, 5.0, attention=attention)
    peaked = SnapKV(pooling="max").score(obs)[0]
    assert torch.all(peaked[7:14] == 1.0) and torch.all(peaked[:7] == 0.01) and torch.all(peaked[14:] == 0.01)
    graded = SnapKV().score(obs)[0]
    assert graded[10] == graded[7] and graded[7] < 1.0  # averaged: the hit itself is diluted
    with pytest.raises(ValueError):
        SnapKV(pooling="median")
