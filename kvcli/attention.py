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
import sys
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


def active_backend() -> AttentionBackend | None:
    """The backend of the innermost `using` (None outside one)."""
    return _active.get()


@contextlib.contextmanager
def using(backend: AttentionBackend):
    token = _active.set(backend)
    try:
        yield backend
    finally:
        _active.reset(token)


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a causal LM's KV cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


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


def rotary_function(attn):
    """apply_rotary_pos_emb of the attention module's own modeling file (None if it has none)."""
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


def _projects_qkv(attn) -> bool:
    """q/k/v/o projections (and optional q/k norms) as Llama, Mistral, Qwen2 and Qwen3 have them."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in names) and rotary_function(attn) is not None


def run_layer_split(model, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor, chunk: int, backend) -> None:
    """One pre-norm decoder layer, in place on hidden [1, N, H], memory linear in N and small.

    Attention over all N tokens is one fused causal call (no mask: the fastest kernels);
    everything around it runs `chunk` tokens at a time, so no [N, H] float32 temporaries
    (RMSNorm's) or [N, intermediate] activations exist: the norm, the q/k/v projections and
    RoPE write each chunk into the whole-prompt query buffer and the backend's key/value
    buffers, the output projection and the MLP add into `hidden` chunk by chunk. Same
    modules and functions as transformers' attention forward, so the same numerics; an
    attention module of another shape runs whole through transformers (more memory).
    """
    _, layers, _, rotary, _ = parts(model)
    layer = layers[layer_idx]
    attn = layer.self_attn
    length = hidden.shape[1]
    spans = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
    if _projects_qkv(attn):
        rotate = rotary_function(attn)
        head_dim = attn.head_dim
        query = None
        for start, stop in spans:
            x = layer.input_layernorm(hidden[:, start:stop])  # [1, c, H]
            cos, sin = rotary(x, position_ids[:, start:stop])
            shape = (1, stop - start, -1, head_dim)
            q = attn.q_proj(x).view(shape)  # [1, c, Hq, D]
            k = attn.k_proj(x).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, Hq|Hkv, c, D]
            if query is None:
                query = q.new_empty(1, q.shape[1], length, head_dim)  # [1, Hq, N, D]
            query[:, :, start:stop] = q
            backend.keys[:, :, start:stop] = k
            backend.values[:, :, start:stop] = attn.v_proj(x).view(shape).transpose(1, 2)
            del x, q, k
        attended = backend.attend_prompt(query, attn.scaling)  # [1, Hq, N, D]
        del query
        for start, stop in spans:
            part = attended[:, :, start:stop].transpose(1, 2).reshape(1, stop - start, -1)  # [1, c, Hq D]
            hidden[:, start:stop] += attn.o_proj(part)
        del attended
    else:
        position_embeddings = rotary(hidden, position_ids)
        with using(backend):
            attended, _ = attn(
                hidden_states=layer.input_layernorm(hidden),
                position_embeddings=position_embeddings,
                attention_mask=None,
                position_ids=position_ids,
            )
        hidden += attended
        del attended
    for start, stop in spans:
        part = hidden[:, start:stop]
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
