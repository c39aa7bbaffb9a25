"""Decoding over a CompressedCache: append the new tokens' K/V, attend over what was kept.

gpt-fast's shape: `forward` runs the model over a few new tokens, `decode` loops one token
at a time and hands each token to a callback as soon as it exists. Attention uses the
Triton kernel on CUDA (one launch per layer for all heads and their own lengths) and the
torch reference elsewhere; on CUDA, Llama-style models run the whole step fused
(kvcli.fastpath: ten launches per layer instead of ~30).
"""

from __future__ import annotations

from typing import Callable

import torch

from dataclasses import replace

from kvcli import attention
from kvcli.cache import CompressedCache, attend_reference
from kvcli.fastpath import FusedDecoder


def in_dtype(cache: CompressedCache, dtype: torch.dtype) -> CompressedCache:
    """`cache` with its keys and values in `dtype` (the cache itself when they already are).

    A document read in bfloat16 decodes in float32 on a CPU (kvcli.precision). The cast
    happens here, once, after eviction: it touches only the kept rows (the prompt's full
    bf16 K/V never exists in float32), and every decode step then appends and attends in
    float32 without converting the cache again. The copy owns its positions and lengths, so
    decoding it leaves `cache` (and its statistics) as read.
    """
    if all(layer.keys.dtype == dtype and layer.values.dtype == dtype for layer in cache.layers):
        return cache
    layers = [
        replace(layer, keys=layer.keys.to(dtype), values=layer.values.to(dtype), positions=layer.positions.clone(), lengths=layer.lengths.clone())
        for layer in cache.layers
    ]
    return replace(cache, layers=layers, next_position=cache.next_position.clone())


class CacheAttention:
    """Attention backend: new tokens are appended to the cache, then attend over it."""

    def __init__(self, cache: CompressedCache, positions: torch.Tensor, *, max_lengths: list[int] | None = None):
        self.cache = cache
        self.positions = positions  # [B, n]
        # With max_lengths (an upper bound of every head's length per layer, i.e. the segment
        # sizes after `reserve`) nothing waits on the GPU: graph-capturable.
        self.max_lengths = max_lengths
        self.use_kernel = cache.layers[0].keys.is_cuda

    def attend(self, layer_idx, query, key, value, scale):
        layer = self.cache.layers[layer_idx]
        reserved = self.max_lengths is not None
        layer.append(key, value, self.positions, reserved=reserved)
        if self.use_kernel:
            from kvcli.kernels.decode_attention import decode_attention

            max_length = self.max_lengths[layer_idx] if reserved else None
            return decode_attention(query, layer.keys, layer.values, layer.offsets, layer.lengths, scale, max_length=max_length)
        return attend_reference(layer, query, scale)


@torch.inference_mode()
def forward(
    model,
    cache: CompressedCache,
    input_ids: torch.Tensor,
    *,
    max_lengths: list[int] | None = None,
    every_position: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """Run input_ids [B, n] after the cache's contents; returns logits of the last token [B, vocab]
    (or of every new token [B, n, vocab] with every_position: teacher forcing in one pass).

    max_lengths: per-layer segment sizes, given when room was reserved (see CacheAttention).
    fused: the fused Llama-style step (kvcli.fastpath); default: on CUDA when the model has it.
    """
    if fused is None:
        fused = cache.layers[0].keys.is_cuda
    decoder = FusedDecoder.for_model(model) if fused else None
    if decoder is not None and decoder.accepts(cache):
        return decoder.forward(cache, input_ids, max_lengths=max_lengths, every_position=every_position)
    n = input_ids.shape[1]
    positions = cache.next_position.unsqueeze(1) + torch.arange(n, device=input_ids.device)  # [B, n]
    hidden = attention.run_layers(model, input_ids, positions, CacheAttention(cache, positions, max_lengths=max_lengths))
    cache.next_position += n
    return attention.logits(model, hidden if every_position else hidden[:, -1])


class GraphedStep:
    """One decode step (every layer, one token per sequence) captured once as a CUDA graph.

    The compressed cache has static shapes (per-head headroom, lengths on the device), so
    the step launches the same kernels every time: replaying the graph removes the
    per-token CPU work (Python, transformers' module calls, ~10 launches per layer) that
    otherwise dominates decoding at batch 1.
    """

    @torch.inference_mode()
    def __init__(self, model, cache: CompressedCache, steps: int, *, fused: bool | None = None):
        cache.reserve(steps + 1)
        self.model, self.cache, self.fused = model, cache, fused
        self.max_lengths = [int(layer.capacity_per_head.max()) for layer in cache.layers]
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.next_position.device)
        saved = [layer.lengths.clone() for layer in cache.layers], cache.next_position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: Triton compiles, allocator settles
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(*saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self._restore(*saved)  # capture records, it does not run: state is unchanged, but be explicit

    def _step(self) -> torch.Tensor:
        return forward(self.model, self.cache, self.tokens, max_lengths=self.max_lengths, fused=self.fused)

    def _restore(self, lengths, next_position) -> None:
        for layer, saved in zip(self.cache.layers, lengths):
            layer.lengths.copy_(saved)
        self.cache.next_position.copy_(next_position)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] -> logits [B, vocab] (a buffer overwritten by the next call)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, vocab] -> next token ids [B]. Greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def decode(
    model,
    cache: CompressedCache,
    first_logits: torch.Tensor,  # [B, vocab] logits after each sequence's prompt
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    cuda_graph: bool | None = None,
) -> list[list[int]]:
    """Generate for every sequence of the cache until a stop token or max_new_tokens.

    on_token(sequence, token_id) is called as soon as each token is chosen (streaming).
    cuda_graph: replay one captured decode step (default: on CUDA, for answers > 8 tokens).
    """
    device = first_logits.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and max_new_tokens > 8
    next_logits = GraphedStep(model, cache, max_new_tokens) if cuda_graph else (lambda tokens: forward(model, cache, tokens))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = first_logits.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    logits = first_logits
    for step in range(max_new_tokens):
        tokens = sample(logits, temperature, generator)  # [B]
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token in stop_ids:
                done[b] = True
                continue
            outputs[b].append(token)
            if on_token is not None:
                on_token(b, token)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = next_logits(tokens.unsqueeze(1))
    return outputs
