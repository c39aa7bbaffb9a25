"""The method contract, parametrized over the registry: every method runs, on both reading
paths, keeps its budget per head, equals the full cache at ratio 1, and is deterministic."""

import pytest
import torch

from kvcli.compress import progressive
from kvcli.compress.methods import METHODS, REGISTRY, make_press, markdown_table
from kvcli.compress.observation import NEEDS
from kvcli.compress.pipeline import prefill
from kvcli.generate import decode
from kvcli.prompts import PromptLayout

DOCUMENT = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike. " * 6
QUESTION = "Which word follows golf?"
COMPRESSING = [m for m in METHODS if REGISTRY[m].scorer is not None]
MODES = {"aware": QUESTION, "agnostic": None}


def kept_positions(cache) -> list[list[list[int]]]:
    return [[layer.head_rows(0, h)[2].tolist() for h in range(layer.num_kv_heads)] for layer in cache.layers]


@pytest.fixture(scope="module")
def model():
    from tests.support import tiny_llama

    return tiny_llama(8, 2, layers=4)[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", COMPRESSING)
def test_method_keeps_its_budget_and_the_prompt_around_the_document(model, method, mode, char_tokenizer):
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, MODES[mode])
    press = make_press(method, ratio=0.25)
    result = prefill(model, layout, press)
    budget = press.budget_for(len(layout.document_ids))
    kept = torch.tensor(result.layer_kept, dtype=torch.float64)  # [L, Hkv] document rows kept
    # the mean over heads and layers is the budget (within one token of rounding per layer)
    assert abs(kept.mean().item() - budget) <= 1.0, (method, kept.mean().item(), budget)
    assert result.compressed
    start, stop = layout.document_range
    outside = set(range(start)) | set(range(stop, len(layout.all_ids)))
    for layer in kept_positions(result.cache):
        for head in layer:
            assert outside <= set(head), "the prefix and the question are always kept"
            assert head == sorted(head) and len(set(head)) == len(head)
    tokens = decode(model, result.cache, result.last_logits[None], max_new_tokens=3, stop_ids=set())
    assert len(tokens[0]) == 3


@pytest.mark.parametrize("method", COMPRESSING)
def test_method_at_ratio_one_is_the_full_cache(model, method, char_tokenizer):
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION)
    full = prefill(model, layout, make_press("full"))
    whole = prefill(model, layout, make_press(method, ratio=1.0))
    assert not whole.compressed
    assert kept_positions(whole.cache) == kept_positions(full.cache)
    for a, b in zip(whole.cache.layers, full.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(whole.last_logits, full.last_logits)


@pytest.mark.parametrize("method", COMPRESSING)
def test_method_is_deterministic_on_both_reading_paths(method, char_tokenizer):
    from tests.support import small_context_llama, text_of

    model = small_context_llama(context=256, layers=2)
    runs = []
    for _ in range(2):
        whole = prefill(model, PromptLayout.build(char_tokenizer, DOCUMENT[:200], None), make_press(method, ratio=0.3))
        chunked = progressive.read_progressive(
            model, PromptLayout.build(char_tokenizer, text_of(600), QUESTION), make_press(method, ratio=0.2),
            context=256, chunk_size=80, answer_tokens=8,
        )
        runs.append((kept_positions(whole.cache), kept_positions(chunked.cache), chunked.max_position))
    assert runs[0] == runs[1]
    assert runs[0][2] < 256  # progressive reading never leaves the context


@pytest.mark.parametrize("method", COMPRESSING)
def test_scorer_declares_only_what_observations_provide(method):
    scorer = make_press(method).scorer
    assert set(scorer.needs) <= NEEDS
    assert scorer.reduce in ("sum", "max")


def test_the_pipeline_computes_only_what_a_scorer_needs(model, char_tokenizer):
    """A scorer that needs keys gets keys and nothing else (no window attention computed)."""
    from kvcli.compress.knorm import Knorm

    seen = []

    class Spy(Knorm):
        def score(self, obs):
            seen.append({name: getattr(obs, name) is not None for name in NEEDS})
            return super().score(obs)

    press = make_press("knorm", ratio=0.25)
    press.scorer = Spy()
    prefill(model, PromptLayout.build(char_tokenizer, DOCUMENT, QUESTION), press)
    assert seen and all(s == {n: n == "keys" for n in NEEDS} for s in seen)


def test_knorm_keeps_the_smallest_key_norms(model, char_tokenizer):
    """Against plain torch on the keys the full cache stores (rotated: RoPE keeps norms, but
    repeated characters would tie before rotation): each head keeps its smallest norms."""
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    result = prefill(model, layout, make_press("knorm", ratio=0.25))
    full = prefill(model, layout, make_press("full"))
    start, stop = layout.document_range
    count = round(0.25 * (stop - start))
    for layer, full_layer in zip(result.cache.layers, full.cache.layers):
        for h in range(2):
            keys = full_layer.head_rows(0, h)[0][start:stop]
            expected = set((keys.float().norm(dim=-1).topk(count, largest=False).indices + start).tolist())
            assert {p for p in layer.head_rows(0, h)[2].tolist() if start <= p < stop} == expected


def test_readme_method_table_is_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
