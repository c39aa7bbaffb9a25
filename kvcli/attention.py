"""Route a transformers model's attention through kvcli, without forking its modeling code.

transformers computes q/k/v, applies RoPE, then calls the function registered under
`config._attn_implementation` in its AttentionInterface. We register one function,
"kvcli", that hands (layer, q, k, v) to whatever *backend* is active in this context:
the layer-by-layer prefill (full attention over one layer's keys, observed for scoring)
or decoding over a CompressedCache. The decoder layers, MLPs and norms stay transformers'
own, so every Llama-style family (Llama, Mistral, Qwen2, Qwen3, SmolLM) works unchanged.

`run_layers` is the model's forward pass, written out so that we choose the positions
and which layers run (the prefill runs one layer at a time).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

import torch

ATTENTION_NAME = "kvcli"


class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """query [B, Hq, n, D], key/value [B, Hkv, n, D] (rotated) -> output [B, Hq, n, D]."""


_active: contextvars.ContextVar[AttentionBackend | None] = contextvars.ContextVar("kvcli_backend", default=None)


def _kvcli_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    backend = _active.get()
    if backend is None:  # plain model(...) calls keep working, as with transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = backend.attend(module.layer_idx, query, key, value, scale)  # [B, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None  # transformers expects [B, n, Hq, D]


def install(model) -> None:
    """Register the kvcli attention function and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _kvcli_attention)
    model.set_attn_implementation(ATTENTION_NAME)


@contextlib.contextmanager
def using(backend: AttentionBackend):
    token = _active.set(backend)
    try:
        yield backend
    finally:
        _active.reset(token)


def parts(model):
    """(embeddings, decoder layers, final norm, rotary embedding, lm head) of a causal LM."""
    base = model.model
    return base.embed_tokens, base.layers, base.norm, base.rotary_emb, model.lm_head


def run_layer(model, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """One decoder layer: hidden [B, n, H], position_ids [B, n] -> [B, n, H]."""
    _, layers, _, rotary, _ = parts(model)
    position_embeddings = rotary(hidden, position_ids)
    out = layers[layer_idx](
        hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings
    )
    return out[0] if isinstance(out, tuple) else out


def is_prenorm_layer(layer) -> bool:
    """Llama-style decoder layer: x + attn(norm(x)), then x + mlp(norm(x)), nothing else."""
    names = {name for name, _ in layer.named_children()}
    return names == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def run_layer_split(model, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor, mlp_chunk: int) -> None:
    """One pre-norm decoder layer, in place on hidden [1, N, H]: attention over all N tokens
    in one call (the fused causal kernels, no mask), then the MLP chunk by chunk, so its
    [chunk, intermediate] activations stay small at any length."""
    _, layers, _, rotary, _ = parts(model)
    layer = layers[layer_idx]
    position_embeddings = rotary(hidden, position_ids)
    attended, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        position_embeddings=position_embeddings,
        attention_mask=None,
        position_ids=position_ids,
    )
    hidden += attended
    del attended
    for start in range(0, hidden.shape[1], mlp_chunk):
        part = hidden[:, start : start + mlp_chunk]
        part += layer.mlp(layer.post_attention_layernorm(part))


def run_layers(model, input_ids: torch.Tensor, position_ids: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
    """The whole forward pass over `backend`: input_ids [B, n] -> last hidden states [B, n, H]."""
    embed, layers, norm, rotary, _ = parts(model)
    hidden = embed(input_ids)
    position_embeddings = rotary(hidden, position_ids)
    with using(backend):
        for layer in layers:
            out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
    return norm(hidden)


def logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden).float()
