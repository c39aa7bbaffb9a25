"""Layer-by-layer prefill that scores and compresses each layer as soon as it is computed.

For each layer, in order:
  1. the prompt goes through the layer in chunks; each chunk attends to this layer's
     keys of all earlier chunks plus itself (causal), and its keys/values are written
     into one full-size buffer for this layer only;
  2. observation queries (the prompt's tail window, then any probe sequences, which
     attend to the whole prompt and are discarded) yield attention over the prompt;
  3. the scorer turns that into scores, the policy picks the kept tokens per head, and
     the kept rows are gathered into the CompressedCache; the full buffer is dropped.
Hidden states move to the next layer with full (uncompressed) attention, as in SnapKV.
So the full KV cache of all layers never exists at once: peak memory is weights +
hidden states + one layer's full K/V + the compressed cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvcli import attention
from kvcli.compress.budgets import CrossLayerPolicy
from kvcli.cache import DEFAULT_HEADROOM, CompressedCache, LayerCache
from kvcli.compress.methods import Press
from kvcli.prompts import PromptLayout
from kvcli.compress.scorers import Observation
from kvcli.compress.window import window_attention

# 2048 tokens per chunk: the MLP activations of a chunk stay small next to one layer's
# K/V at long lengths, and chunks are still large enough to keep the matmuls efficient.
DEFAULT_CHUNK = 2048


@dataclass
class PrefillResult:
    cache: CompressedCache
    last_logits: torch.Tensor  # [vocab] after the last prompt token
    compression_seconds: float  # scoring + selection + gathering, not the layer compute
    prefill_seconds: float
    full_bytes: int  # what an uncompressed cache of the same prompt would take
    compressed: bool  # False when the document fit in the budget (kept whole)
    layer_kept: list[list[int]] = field(default_factory=list)  # [L][Hkv] document tokens kept


class _LayerPrefill:
    """Attention backend for one layer: chunks of the prompt, then observing probes."""

    def __init__(self, num_kv_heads: int, head_dim: int, length: int, like: torch.Tensor, window: int, reduce: str):
        self.keys = like.new_empty(1, num_kv_heads, length, head_dim)  # [1, Hkv, N, D]
        self.values = like.new_empty(1, num_kv_heads, length, head_dim)
        self.length = length
        self.window = window
        self.reduce = reduce
        self.start = 0  # first prompt position of the chunk being run
        self.probe = False
        self.window_queries: list[torch.Tensor] = []
        self.observed: torch.Tensor | None = None  # [Hkv, N] reduced attention over the prompt

    def attend(self, layer_idx, query, key, value, scale):
        n = query.shape[2]
        if self.probe:
            keys = torch.cat([self.keys, key], dim=2)
            values = torch.cat([self.values, value], dim=2)
            self._observe(query[0], keys[0], scale, causal_offset=self.length)
        else:
            stop = self.start + n
            self.keys[:, :, self.start : stop] = key
            self.values[:, :, self.start : stop] = value
            keys, values = self.keys[:, :, :stop], self.values[:, :, :stop]
            self._keep_window(query)
        return self._attention(query, keys, values, scale)

    def attend_prompt(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Queries of the whole prompt [1, Hq, N, D], whose keys/values the caller already
        wrote into self.keys/self.values (attention.run_layer_split) -> [1, Hq, N, D]."""
        self.start = 0
        self._keep_window(query)
        return self._attention(query, self.keys, self.values, scale)

    def _keep_window(self, query: torch.Tensor) -> None:
        first_window = self.length - self.window
        if self.window and self.start + query.shape[2] > first_window:
            # a copy: a view would keep the whole chunk's queries alive until scoring
            self.window_queries.append(query[0, :, max(first_window - self.start, 0) :].clone())

    @staticmethod
    def _attention(query, keys, values, scale):
        n = query.shape[2]
        if n == keys.shape[2]:  # the whole prompt at once: plain causal, the fastest kernels
            return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        mask = causal_lower_right(n, keys.shape[2])
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)

    def observe_window(self, scale: float) -> None:
        if self.window_queries:
            queries = torch.cat(self.window_queries, dim=1)  # [Hq, W, D]
            self._observe(queries, self.keys[0], scale, causal_offset=self.length - queries.shape[1])

    def _observe(self, queries, keys, scale, causal_offset):
        seen = window_attention(queries, keys, scale, causal_offset, self.reduce)[:, : self.length]
        if self.observed is None:
            self.observed = seen
        elif self.reduce == "max":
            self.observed = torch.maximum(self.observed, seen)
        else:
            self.observed = self.observed + seen


def _reallocate(policy, layers, candidate_scores, budget, prefix_len, tail_len, headroom) -> None:
    """Apply a cross-layer re-allocation: trim every layer seen so far to its new share.

    A layer's rows per head are [prefix][document candidates][question]; only the
    candidates are trimmed.
    """
    survivors = policy.reallocate(candidate_scores, budget)
    for l, heads in enumerate(survivors):
        rows = []
        for kept, candidates in zip(heads, candidate_scores[l]):
            tail_start = prefix_len + len(candidates)
            rows.append(torch.cat([torch.arange(prefix_len), kept + prefix_len, torch.arange(tail_start, tail_start + tail_len)]))
        layers[l] = layers[l].subset(rows, headroom)
        candidate_scores[l] = [c[k] for k, c in zip(heads, candidate_scores[l])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(
    model,
    layout: PromptLayout,
    press: Press,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    headroom: int = DEFAULT_HEADROOM,
    progress: Callable[[int, int], None] | None = None,
    whole_attention: bool | None = None,
) -> PrefillResult:
    """Read the prompt (prefix + document [+ question]) and return its compressed cache.

    whole_attention: attention over the whole prompt in one fused causal call, only the
    MLP chunked (default on CUDA: memory stays linear in length there); otherwise both
    are chunked (the CPU's SDPA may materialize the attention matrix).
    """
    num_layers, num_kv_heads, head_dim = attention.cache_shape(model)
    device = next(model.parameters()).device
    embed, _, norm, _, _ = attention.parts(model)

    ids = layout.all_ids
    length = len(ids)
    doc_start, doc_stop = layout.document_range
    doc_length = doc_stop - doc_start
    budget = press.budget_for(doc_length)
    scorer = press.scorer if budget is not None else None
    policy = press.policy
    window = scorer.window(layout) if scorer is not None and scorer.observes else 0
    probe_ids = scorer.probes(layout, layout.tokenizer) if scorer is not None and scorer.observes else []
    reduce = scorer.reduce if scorer is not None else "sum"

    started = time.perf_counter()
    positions = torch.arange(length, device=device)
    hidden = embed(torch.tensor([ids], device=device))  # [1, N, H]
    probes = [embed(torch.tensor([p], device=device)) for p in probe_ids]  # [1, P, H] each
    probe_positions = [torch.arange(length, length + len(p), device=device).unsqueeze(0) for p in probe_ids]
    always = torch.cat([torch.arange(doc_start), torch.arange(doc_stop, length)]).to(device)  # prefix + question

    if whole_attention is None:
        whole_attention = device.type == "cuda"
    whole_attention = whole_attention and attention.is_prenorm_layer(attention.parts(model)[1][0])
    layers: list[LayerCache] = []
    candidate_scores: list[list[torch.Tensor]] = []
    compression_seconds = 0.0
    for layer_idx in range(num_layers):
        backend = _LayerPrefill(num_kv_heads, head_dim, length, hidden, window, reduce)
        with attention.using(backend):
            if whole_attention:
                attention.run_layer_split(model, layer_idx, hidden, positions.unsqueeze(0), chunk_size, backend)
            else:
                for start in range(0, length, chunk_size):
                    backend.start = start
                    stop = min(start + chunk_size, length)
                    # In place is safe: later chunks read only their own slice of the input.
                    hidden[:, start:stop] = attention.run_layer(model, layer_idx, hidden[:, start:stop], positions[start:stop].unsqueeze(0))
            backend.probe = True
            for i, probe in enumerate(probes):
                probes[i] = attention.run_layer(model, layer_idx, probe, probe_positions[i])
        _sync(device)
        tick = time.perf_counter()
        backend.observe_window(head_dim**-0.5)
        if scorer is None:
            kept = [torch.arange(length)] * num_kv_heads
            doc_scores = None
        else:
            # Scores stay on the device: sorting 8 heads x 128K tokens per layer on the CPU
            # costs more than the layer's attention.
            observed = backend.observed[:, doc_start:doc_stop].float() if backend.observed is not None else None
            doc_scores = scorer.score(Observation(layer_idx, observed, doc_length, num_kv_heads)).float().to(device)
            chosen = policy.select(layer_idx, num_layers, doc_scores, budget)
            kept = [torch.sort(torch.cat([always, c + doc_start])).values for c in chosen]
        layers.append(LayerCache.from_kept(backend.keys[0], backend.values[0], positions, kept, headroom))
        if isinstance(policy, CrossLayerPolicy) and doc_scores is not None:
            candidate_scores.append([doc_scores[h, c].cpu() for h, c in enumerate(chosen)])
            if policy.due(layer_idx, num_layers):
                _reallocate(policy, layers, candidate_scores, budget, doc_start, length - doc_stop, headroom)
        del backend
        _sync(device)
        compression_seconds += time.perf_counter() - tick
        if progress is not None:
            progress(layer_idx + 1, num_layers)

    last_logits = attention.logits(model, norm(hidden[:, -1:]))[0, -1]
    _sync(device)
    cache = CompressedCache(
        layers=layers,
        next_position=torch.tensor([length], device=device),
        original_length=length,
    )
    prompt_other = length - doc_length
    return PrefillResult(
        cache=cache,
        last_logits=last_logits,
        compression_seconds=compression_seconds,
        prefill_seconds=time.perf_counter() - started,
        full_bytes=num_layers * num_kv_heads * length * head_dim * 2 * layers[0].keys.element_size(),
        compressed=scorer is not None,
        layer_kept=[[int(n) - prompt_other for n in layer.lengths[0].tolist()] for layer in layers],
    )
