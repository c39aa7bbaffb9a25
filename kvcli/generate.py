"""Decoding over a CompressedCache: append the new tokens' K/V, attend over what was kept.

gpt-fast's shape: `forward` runs the model over a few new tokens, `decode` loops one token
at a time and hands each token to a callback as soon as it exists. Attention uses the
Triton kernel on CUDA (one launch per layer for all heads and their own lengths) and the
torch reference elsewhere.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvcli import attention
from kvcli.cache import CompressedCache, attend_reference


class CacheAttention:
    """Attention backend: new tokens are appended to the cache, then attend over it."""

    def __init__(self, cache: CompressedCache, positions: torch.Tensor):
        self.cache = cache
        self.positions = positions  # [B, n]
        self.use_kernel = cache.layers[0].keys.is_cuda

    def attend(self, layer_idx, query, key, value, scale):
        layer = self.cache.layers[layer_idx]
        layer.append(key, value, self.positions)
        if self.use_kernel:
            from kvcli.kernels.decode_attention import decode_attention

            return decode_attention(query, layer.keys, layer.values, layer.offsets, layer.lengths, scale)
        return attend_reference(layer, query, scale)


@torch.inference_mode()
def forward(model, cache: CompressedCache, input_ids: torch.Tensor) -> torch.Tensor:
    """Run input_ids [B, n] after the cache's contents; returns logits of the last token [B, vocab]."""
    n = input_ids.shape[1]
    positions = cache.next_position.unsqueeze(1) + torch.arange(n, device=input_ids.device)  # [B, n]
    hidden = attention.run_layers(model, input_ids, positions, CacheAttention(cache, positions))
    cache.next_position += n
    return attention.logits(model, hidden[:, -1])


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
) -> list[list[int]]:
    """Generate for every sequence of the cache until a stop token or max_new_tokens.

    on_token(sequence, token_id) is called as soon as each token is chosen (streaming).
    """
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
        logits = forward(model, cache, tokens.unsqueeze(1))
    return outputs
