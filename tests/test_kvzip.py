"""KVzip against a plain-torch recomputation of the reference's chunked scoring."""

import pytest
import torch

from kvcli.compress.methods import make_press
from kvcli.compress.pipeline import prefill
from kvcli.compress.scorers import KVzip
from kvcli.prompts import PromptLayout

DOCUMENT = "".join(f"Line {i} says the code is {i * 37 % 101}. " for i in range(14))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reference_scores(model, layout, scorer) -> list[torch.Tensor]:
    """Per layer [Hkv, T_doc]: each chunk's probe, run after the whole prompt, scores its own
    chunk with a softmax over [prefix][chunk][probe]; max over probe queries and the group."""
    config = model.config
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    prompt = layout.all_ids
    sinks, n = len(layout.prefix_ids), len(prompt)
    out = [torch.zeros(hkv, len(layout.document_ids)) for _ in range(config.num_hidden_layers)]
    for probe in scorer.probes(layout, layout.tokenizer):
        ids = torch.tensor([prompt + probe.ids])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
            positions = torch.arange(ids.shape[1])[None]
            cos, sin = model.model.rotary_emb(hidden[0], positions)
            for l, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(hidden[l])
                q = rotate(layer.self_attn.q_proj(x).view(1, -1, hq, d).transpose(1, 2), cos[:, None], sin[:, None])[0]
                k = rotate(layer.self_attn.k_proj(x).view(1, -1, hkv, d).transpose(1, 2), cos[:, None], sin[:, None])[0]
                start, stop = probe.span
                a, b = sinks + start, sinks + stop
                keys = torch.cat([k[:, :sinks], k[:, a:b], k[:, n:]], dim=1)  # [Hkv, S, D]
                keys = keys.repeat_interleave(hq // hkv, dim=0)
                logits = q[:, n:] @ keys.transpose(1, 2) * d**-0.5  # [Hq, P, S]
                p = len(probe.ids)
                visible = torch.arange(keys.shape[1])[None] <= (keys.shape[1] - p + torch.arange(p))[:, None]
                probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)[:, :, sinks : sinks + b - a]
                out[l][:, start:stop] = probs.amax(dim=1).view(hkv, hq // hkv, -1).amax(dim=1)
    return out


@pytest.mark.parametrize("chunk_size", [10_000, 120, 50], ids=["1-chunk", "3-chunks", "8-chunks"])
def test_kvzip_scores_match_the_chunked_reference(chunk_size, char_tokenizer, monkeypatch):
    """On the CPU the probes attend through split_attention (their scoring log-sum-exp from
    its pieces): the second layer's scores also check the merged attention output."""
    from kvcli.compress import pipeline
    from tests.support import tiny_llama

    splits = []
    real_split = pipeline.split_attention
    monkeypatch.setattr(pipeline, "split_attention", lambda *a: splits.append(1) or real_split(*a))

    reference, ours = tiny_llama(8, 2, layers=2)
    reference.set_attn_implementation("eager")
    layout = PromptLayout.build(char_tokenizer, DOCUMENT[: {10_000: 400, 120: 360, 50: 400}[chunk_size]], None)
    seen = []

    class Spy(KVzip):
        def score(self, obs):
            seen.append(obs.attention.clone())
            return super().score(obs)

    scorer = Spy(chunk_size=chunk_size)
    press = make_press("kvzip", ratio=0.3)
    press.scorer = scorer
    prefill(ours, layout, press)
    expected = reference_scores(reference, layout, scorer)
    chunks = len(scorer.probes(layout, layout.tokenizer))
    assert chunks == {10_000: 1, 120: 3, 50: 8}[chunk_size]
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert len(splits) == chunks * 2  # every probe, every layer


def test_continuation_probe_starts_with_the_previous_chunk_tail(char_tokenizer):
    layout = PromptLayout.build(char_tokenizer, DOCUMENT, None)
    first, second = KVzip(chunk_size=100).probes(layout, char_tokenizer)[:2]
    doc = layout.document_ids
    assert first.span == (0, 100) and second.span == (100, 200)
    assert first.ids[-100:] == doc[:100] and second.ids[-100:] == doc[100:200]
    assert doc[92:100] == second.ids[-100 - len(layout.template.suffix) - 8 : -100 - len(layout.template.suffix)]
    assert layout.question_part("Repeat the previous context exactly.") == first.ids[:-100]


def test_split_probe_attention_changes_nothing_in_a_progressive_read(monkeypatch):
    """A document 4x the context: later steps attend head by head, each probe through
    split_attention; with it switched off (one masked call and one fused call for the
    log-sum-exp, as before) the kept rows and every score are the same."""
    from kvcli import api
    from kvcli.compress import pipeline
    from tests.support import small_context_llama, text_of
    from tests.test_longdoc import document, loaded

    model = small_context_llama(256)
    recorded = []

    class Spy(KVzip):
        def score(self, obs):
            recorded.append(obs.attention.clone())
            return super().score(obs)

    def read():
        press = make_press("kvzip", budget=48)
        press.scorer = Spy(chunk_size=60)
        result = api.read(loaded(model, 256), document(text_of(1024)), press, question=None, headroom_tokens=16, chunk_size=96)
        return [layer.positions.clone() for layer in result.cache.layers]

    splits = []
    real_split = pipeline.split_attention
    monkeypatch.setattr(pipeline, "split_attention", lambda *a: splits.append(1) or real_split(*a))
    with_split = read()
    split_scores, recorded[:] = list(recorded), []
    monkeypatch.setattr(pipeline, "split_attention", lambda *a: None)
    without = read()
    assert len(splits) > 2 * len(with_split)  # probes of several steps, head by head
    assert all(torch.equal(a, b) for a, b in zip(with_split, without))
    for a, b in zip(split_scores, recorded):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
