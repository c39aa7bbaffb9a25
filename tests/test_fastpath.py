"""The fused decode step (kvcli.fastpath) and the lean prefill layer against transformers' layers.

On the CPU the Triton kernels run in the interpreter (tests/conftest.py), fp32: differences
from the transformers path are reduction-order rounding only.
"""

import copy

import pytest
import torch

from kvcli.attention import install
from kvcli.compress.methods import make_press
from kvcli.compress.pipeline import prefill
from kvcli.fastpath import FusedDecoder, unsupported_reason
from kvcli.generate import decode, forward
from kvcli.prompts import PromptLayout
from tests.support import tiny_llama

DOCUMENT = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike. " * 4
QUESTION = "Which word follows golf?"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same_cache(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.lengths, lb.lengths)
        assert torch.equal(la.offsets, lb.offsets)
        for batch in range(la.lengths.shape[0]):
            for h in range(la.num_kv_heads):
                ka, va, pa = la.head_rows(batch, h)
                kb, vb, pb = lb.head_rows(batch, h)
                assert torch.equal(pa, pb)
                torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.next_position, b.next_position)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["MHA", "GQA4"])
def test_fused_step_matches_transformers_layers(heads, char_tokenizer):
    _, ours = tiny_llama(*heads, layers=2)
    ours.to(DEVICE)
    assert unsupported_reason(ours) is None
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    result = prefill(ours, layout, make_press("ada-snapkv", ratio=0.3))
    plain, fused = result.cache.clone(), result.cache.clone()
    question = torch.tensor([layout.question_part(QUESTION)], device=DEVICE)  # n > 1 new tokens
    torch.testing.assert_close(
        forward(ours, fused, question, fused=True), forward(ours, plain, question, fused=False), atol=1e-4, rtol=1e-4
    )
    for token in (5,):  # then one token at a time
        step = torch.tensor([[token]], device=DEVICE)
        torch.testing.assert_close(forward(ours, fused, step, fused=True), forward(ours, plain, step, fused=False), atol=1e-4, rtol=1e-4)
    assert_same_cache(fused, plain)


def test_fused_batch_and_every_position(char_tokenizer):
    _, ours = tiny_llama(8, 1, layers=2)  # MQA
    ours.to(DEVICE)
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    result = prefill(ours, layout, make_press("snapkv", ratio=0.4))
    ids = torch.tensor([layout.question_part("first?"), layout.question_part("other?")], device=DEVICE)  # [2, n]
    plain, fused = result.cache.repeat(2), result.cache.repeat(2)
    expected = forward(ours, plain, ids, every_position=True, fused=False)
    got = forward(ours, fused, ids, every_position=True, fused=True)
    assert got.shape == (2, ids.shape[1], 256)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert_same_cache(fused, plain)
    greedy = decode(ours, fused, got[:, -1], max_new_tokens=3, stop_ids=set(), cuda_graph=False)
    assert greedy == decode(ours, plain, expected[:, -1], max_new_tokens=3, stop_ids=set(), cuda_graph=False)


def test_fused_weights_are_views_so_the_model_is_unchanged():
    reference, ours = tiny_llama(8, 2)
    decoder = FusedDecoder(ours)
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == decoder.layers[0].qkv.untyped_storage().data_ptr()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    )
    reference = Qwen3ForCausalLM(copy.deepcopy(config)).eval()
    ours = Qwen3ForCausalLM(copy.deepcopy(config)).eval()
    ours.load_state_dict(reference.state_dict())
    install(ours)
    return reference, ours


def test_unsupported_models_decode_through_transformers_layers(char_tokenizer):
    reference, ours = tiny_qwen3()
    reference.to(DEVICE)
    ours.to(DEVICE)
    assert unsupported_reason(ours) == "model type 'qwen3'"
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    result = prefill(ours, layout, make_press("full"))
    ids = torch.tensor([layout.all_ids], device=DEVICE)
    nxt = torch.tensor([[7]], device=DEVICE)
    step = forward(ours, result.cache, nxt, fused=True)  # asked for, not available: the plain path
    with torch.no_grad():
        expected = reference(torch.cat([ids, nxt], 1)).logits[0, -1]
    torch.testing.assert_close(step[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: tiny_llama(8, 2), tiny_qwen3], ids=["llama", "qwen3-qk-norm"])
def test_lean_whole_prompt_layer_matches_chunked_prefill(make, char_tokenizer):
    """run_layer_split's chunked projections + one attention call == the chunk-by-chunk CPU path."""
    _, ours = make()
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    press = make_press("ada-snapkv", ratio=0.3)
    chunked = prefill(ours, layout, press, chunk_size=45, whole_attention=False)
    whole = prefill(ours, layout, press, chunk_size=45, whole_attention=True)
    torch.testing.assert_close(whole.last_logits, chunked.last_logits, atol=1e-5, rtol=1e-5)
    assert whole.layer_kept == chunked.layer_kept
    assert_same_cache(whole.cache, chunked.cache)
