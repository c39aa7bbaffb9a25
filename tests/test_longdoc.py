"""Documents longer than the context: progressive reading (kvcli.compress.progressive) on tiny random models."""


import pytest
import torch

from kvcli import api
from kvcli.compress import progressive as longdoc
from kvcli.compress.methods import METHODS, default_method, make_press
from kvcli.compress.pipeline import prefill
from kvcli.documents import Document, PageSpan
from kvcli.generate import decode, forward
from kvcli.models import LoadedModel
from kvcli.prompts import PromptLayout
from tests.support import CharTokenizer, small_context_llama, text_of, tiny_llama

QUESTION = "Which fox jumps?"


def loaded(model, context) -> LoadedModel:
    return LoadedModel(model, CharTokenizer(), "tiny", "tiny", torch.device("cpu"), torch.float32, context, 0.0)


def document(text: str) -> Document:
    return Document(name="doc.txt", text=text, sha256="0" * 64, pages=[PageSpan(1, 0, len(text))])


# ---- RoPE re-indexing -----------------------------------------------------------------


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_rerotated_keys_equal_keys_rotated_at_the_compact_positions(rope_scaling):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = small_context_llama(context=512, rope_scaling=rope_scaling)
    rotary = model.model.rotary_emb
    torch.manual_seed(1)
    raw_k = torch.randn(1, 1, 40, 16, dtype=torch.float64).float()
    raw_q = torch.randn(1, 1, 5, 16)
    original = torch.randint(0, 500, (40,))
    compact = torch.randint(0, 200, (40,))
    q_positions = torch.arange(300, 305)

    def rope(x, positions):
        cos, sin = rotary(x, positions.unsqueeze(0))
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    at_original = rope(raw_k, original)[0, 0]  # what the cache stores
    direct = rope(raw_k, compact)[0, 0]  # keys rotated at the compact positions directly
    moved = longdoc.rotate_keys(rotary, at_original, compact - original)
    torch.testing.assert_close(moved, direct, atol=1e-5, rtol=1e-5)
    q = rope(raw_q, q_positions)[0, 0]
    torch.testing.assert_close(q @ moved.T, q @ direct.T, atol=1e-4, rtol=1e-4)
    # and the score depends only on the distance: shifting query and keys alike changes nothing
    shifted = longdoc.rotate_keys(rotary, direct, torch.full((40,), -100))
    q_shifted = rope(raw_q, q_positions - 100)[0, 0]
    torch.testing.assert_close(q_shifted @ shifted.T, q @ direct.T, atol=1e-4, rtol=1e-4)


# ---- documents that fit keep today's path --------------------------------------------


@pytest.mark.parametrize("question", [QUESTION, None], ids=["aware", "agnostic"])
def test_a_document_that_fits_is_read_as_before(question):
    _, model = tiny_llama(8, 2)
    text = text_of(600)
    press = make_press("ada-snapkv", ratio=0.3)
    result = api.read(loaded(model, 4096), document(text), press, question=question, headroom_tokens=32)
    assert result.progressive is None
    assert not isinstance(result.prefill, longdoc.ProgressiveResult)
    layout = PromptLayout.build(CharTokenizer(), text, question)
    expected = prefill(model, layout, press, headroom=32 + 64)
    assert torch.equal(result.prefill.last_logits, expected.last_logits)
    assert result.cache.next_position.tolist() == expected.cache.next_position.tolist()
    for ours, theirs in zip(result.cache.layers, expected.cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert torch.equal(ours.positions, theirs.positions) and torch.equal(ours.lengths, theirs.lengths)
    assert "progressive" not in result.stats()


def test_chunked_reading_without_eviction_equals_one_prefill(char_tokenizer):
    """Budget >= document: every step keeps everything, positions never move: same logits as prefill."""
    _, model = tiny_llama(8, 2)
    layout = PromptLayout.build(char_tokenizer, text_of(700), QUESTION)
    full = prefill(model, layout, make_press("full"))
    press = make_press("snapkv", budget=5000)
    result = longdoc.read_progressive(model, layout, press, context=4096, chunk_size=150, answer_tokens=16)
    assert result.plan.chunks == 5
    assert result.compact_length == len(layout.all_ids)
    torch.testing.assert_close(result.last_logits, full.last_logits, atol=1e-4, rtol=1e-4)
    nxt = torch.tensor([[7]])
    torch.testing.assert_close(forward(model, result.cache, nxt), forward(model, full.cache, nxt), atol=1e-4, rtol=1e-4)


# ---- longer than the context -----------------------------------------------------------


class PositionSpy:
    """Records every position the rotary embedding is asked for."""

    def __init__(self, model):
        self.rotary = model.model.rotary_emb
        self.original = self.rotary.forward
        self.highest = -1

        def spy(x, position_ids):
            self.highest = max(self.highest, int(position_ids.max()))
            return self.original(x, position_ids)

        self.rotary.forward = spy


@pytest.mark.parametrize("method", ["ada-snapkv", "kvzip", "streaming", "dynamic"])
@pytest.mark.parametrize("question", [QUESTION, None], ids=["aware", "agnostic"])
def test_four_times_the_context_never_uses_a_position_beyond_it(method, question):
    context = 256
    model = small_context_llama(context)
    spy = PositionSpy(model)
    text = text_of(4 * context)
    result = api.read(loaded(model, context), document(text), make_press(method, budget=48), question=question, headroom_tokens=16, chunk_size=96)
    assert result.progressive is not None and result.progressive["chunks"] >= 4
    assert api.progressive_notice(result).startswith(f"document is {len(text)} tokens")
    info = result.prefill
    assert spy.highest < context and info.max_position < context
    assert int(result.cache.next_position[0]) == info.compact_length < context
    # positions keep the ORIGINAL prompt positions of the kept rows: later chunks survive
    layout = PromptLayout.build(CharTokenizer(), text, question)
    doc_start, doc_stop = layout.document_range
    original = torch.cat([layer.positions[0][layer.positions[0] >= 0] for layer in result.cache.layers])
    if method != "kvzip":  # (KVzip's max-over-steps scores favour early rows on a random model)
        assert int(original.max()) >= doc_stop - result.progressive["chunk_size"] and int(original.max()) >= context
    assert int(original.max()) < doc_stop + len(layout.question_ids)
    assert int(original.min()) == 0  # the prefix is kept
    # it decodes, still within the context
    answers = api.answer(loaded(model, context), result, [QUESTION], api.Generation(max_new_tokens=8))
    assert answers[0].tokens >= 1
    assert spy.highest < context


def test_compact_positions_match_what_the_keys_are_rotated_at(char_tokenizer):
    """Rotating the stored keys back to their ORIGINAL positions gives the keys as computed there."""
    model = small_context_llama(256, layers=1)
    layout = PromptLayout.build(char_tokenizer, text_of(900), None)
    result = longdoc.read_progressive(model, layout, make_press("snapkv", budget=40), context=256, chunk_size=80, answer_tokens=16)
    # layer 0 keys depend only on the token and its position: recompute them at the original positions
    layer = result.cache.layers[0]
    # the scheme of kvcli.compress.progressive: the prefix at 0..p-1, each head's document rows
    # right-aligned so that they end just before next_position
    p, end = len(layout.prefix_ids), int(result.cache.next_position[0])
    lengths = layer.lengths[0].tolist()
    compact = [torch.cat([torch.arange(p), torch.arange(end - (n - p), end)]) for n in lengths]
    ids = torch.tensor([layout.all_ids])
    attn = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    raw = attn.k_proj(hidden).view(1, -1, 2, 16).transpose(1, 2)[0]  # [Hkv, N, D] before RoPE
    for h in range(2):
        keys, _, original = layer.head_rows(0, h)
        back = longdoc.rotate_keys(model.model.rotary_emb, keys, original.long() - compact[h])
        direct = longdoc.rotate_keys(model.model.rotary_emb, raw[h, original.long()], original.long())
        torch.testing.assert_close(back, direct, atol=1e-4, rtol=1e-4)


def test_memory_stays_bounded_as_the_document_grows(char_tokenizer):
    context = 256
    model = small_context_llama(context)
    peaks, sizes = [], []
    for factor in (2, 4, 8):
        layout = PromptLayout.build(char_tokenizer, text_of(factor * context), QUESTION)
        result = longdoc.read_progressive(model, layout, make_press("ada-snapkv", budget=48), context=context, chunk_size=64, answer_tokens=16)
        assert result.plan.chunks >= 2 * factor
        peaks.append(result.peak_rows)
        sizes.append(result.cache.nbytes())
        assert max(step["next_position"] for step in result.steps) < context
    # budget + one chunk, whatever the length: the same bound at 2x, 4x and 8x
    plan = result.plan
    bound = 2 * 2 * (len(layout.prefix_ids) + plan.cap + plan.chunk_size + len(layout.question_ids))  # layers x heads x rows
    assert max(peaks) <= bound
    assert max(peaks) - min(peaks) <= 0.1 * max(peaks), peaks
    assert max(sizes) <= 1.1 * min(sizes), sizes


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_every_method_reads_progressively_and_decodes(method, char_tokenizer):
    model = small_context_llama(256)
    layout = PromptLayout.build(char_tokenizer, text_of(700), QUESTION)
    result = longdoc.read_progressive(model, layout, make_press(method, ratio=0.1), context=256, chunk_size=64, answer_tokens=8)
    tokens = decode(model, result.cache, result.last_logits[None], max_new_tokens=4, stop_ids=set())
    assert len(tokens[0]) == 4 and int(result.cache.next_position[0]) < 256


def test_max_context_forces_chunking_and_full_falls_back():
    _, model = tiny_llama(8, 2)
    text = text_of(800)
    result = api.read(loaded(model, 4096), document(text), make_press("full"), question=QUESTION, headroom_tokens=16, max_context=300)
    assert result.progressive["context"] == 300 and result.press.name == default_method(agnostic=False)
    assert result.prefill.max_position < 300
    (answer,) = api.answer(loaded(model, 4096), result, [QUESTION], api.Generation(max_new_tokens=4))
    assert answer.tokens >= 1
