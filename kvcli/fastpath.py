"""A fused decode step for Llama-style decoder layers on CUDA (Llama, Mistral, Qwen2, SmolLM).

At batch 1 a decode step reads every weight once (the bandwidth floor) but transformers'
decoder layer launches ~30 kernels per layer (norms as five kernels, RoPE as ten, the
residual adds, kvcli's cache append as four); inside a CUDA graph each still costs a few
microseconds, ~3.5 ms per step on an 8B model, a third of the whole step. This path runs
the same arithmetic in ten launches per layer:

    rms_norm -> x @ [Wq;Wk;Wv] -> rope_append (rotate q,k; append k,v; lengths += n)
    -> decode_attention -> x + attn @ Wo (one addmm) -> rms_norm -> x @ [Wgate;Wup]
    -> silu_mul -> x + act @ Wdown (one addmm)

It reads the model's own weights: q/k/v and gate/up are concatenated once and the
modules' parameters become views of the concatenation, so no weight is held twice and
transformers' modules (the prefill, the CPU path) keep working on the same storage.
Models it does not recognise (another layer structure, q/k norms, biases other than
q/k/v) decode through transformers' layers as before (kvcli.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcli import attention
from kvcli.cache import CompressedCache

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor  # [H]
    input_eps: float
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    qkv_bias: torch.Tensor | None
    out: torch.Tensor  # [H, Hq D]
    post_norm: torch.Tensor  # [H]
    post_eps: float
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


def unsupported_reason(model) -> str | None:
    """Why `model` cannot use the fused step (None: it can)."""
    from kvcli.kernels import triton_available

    config = model.config
    device = next(model.parameters()).device
    if not triton_available(device):
        return "no Triton for this device"
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    _, layers, _, _, _ = attention.parts(model)
    for layer in layers:
        if not attention.is_prenorm_layer(layer):
            return "not a pre-norm decoder layer"
        attn, mlp = layer.self_attn, layer.mlp
        if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
            return "q/k normalisation"
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(not isinstance(p, torch.nn.Linear) for p in projections):
            return "unexpected projections"
        if any(p.bias is not None for p in projections[3:]):
            return "output or MLP biases"
        if (attn.q_proj.bias is None) != (attn.k_proj.bias is None) or (attn.q_proj.bias is None) != (attn.v_proj.bias is None):
            return "partial q/k/v biases"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or {n for n, _ in norm.named_parameters()} != {"weight"}:
                return "not an RMSNorm"
    head_dim = layers[0].self_attn.head_dim
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        return f"head_dim {head_dim}"
    return None


def _concatenate(modules: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
    """One tensor holding the modules' `name` parameters back to back; the modules get views of it."""
    parts = [getattr(m, name) for m in modules]
    if parts[0] is None:
        return None
    whole = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for module, part in zip(modules, parts):
        stop = start + part.shape[0]
        setattr(module, name, torch.nn.Parameter(whole[start:stop], requires_grad=False))
        start = stop
    return whole


class FusedDecoder:
    """The fused decode step over a CompressedCache (build with `for_model`)."""

    def __init__(self, model):
        self.model = model
        self.embed, layers, self.norm, self.rotary, self.lm_head = attention.parts(model)
        first = layers[0].self_attn
        self.num_q_heads = model.config.num_attention_heads
        self.num_kv_heads = model.config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scale = first.scaling
        self.dtype = first.q_proj.weight.dtype
        self.layers = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            self.layers.append(_LayerWeights(
                input_norm=layer.input_layernorm.weight,
                input_eps=layer.input_layernorm.variance_epsilon,
                qkv=_concatenate(projections, "weight"),
                qkv_bias=_concatenate(projections, "bias"),
                out=attn.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
                post_eps=layer.post_attention_layernorm.variance_epsilon,
                gate_up=_concatenate([mlp.gate_proj, mlp.up_proj], "weight"),
                down=mlp.down_proj.weight,
            ))

    @classmethod
    def for_model(cls, model) -> "FusedDecoder | None":
        """The model's fused decoder (built once, kept on the model), or None if unsupported."""
        if not hasattr(model, "_kvcli_fused"):
            model._kvcli_fused = None if unsupported_reason(model) else cls(model)
        return model._kvcli_fused

    def accepts(self, cache: CompressedCache) -> bool:
        layer = cache.layers[0]
        return layer.keys.dtype == self.dtype and layer.keys.device == self.layers[0].qkv.device

    @torch.inference_mode()
    def forward(
        self, cache: CompressedCache, input_ids: torch.Tensor, *, max_lengths: list[int] | None = None, every_position: bool = False
    ) -> torch.Tensor:
        """input_ids [B, n] after the cache's contents -> logits of the last token [B, vocab]
        (of every new token [B, n, vocab] with every_position).

        max_lengths: per-layer segment sizes after `cache.reserve` (no host sync: graph-capturable).
        """
        from kvcli.kernels.decode_attention import decode_attention
        from kvcli.kernels.rms_norm import rms_norm
        from kvcli.kernels.rope_append import rope_append
        from kvcli.kernels.silu_mul import silu_mul

        batch, n = input_ids.shape
        if max_lengths is None:
            cache.reserve(n)
        positions = cache.next_position.unsqueeze(1) + torch.arange(n, device=input_ids.device)  # [B, n]
        hidden = self.embed(input_ids)  # [B, n, H]
        cos, sin = self.rotary(hidden, positions)  # [B, n, D] each
        cos, sin = cos.reshape(batch * n, -1).contiguous(), sin.reshape(batch * n, -1).contiguous()
        x = hidden.reshape(batch * n, -1)  # [T, H], T = B n
        for i, (w, layer) in enumerate(zip(self.layers, cache.layers)):
            h = rms_norm(x, w.input_norm, w.input_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)  # [T, (Hq + 2 Hkv) D]
            q = rope_append(qkv, cos, sin, layer.keys, layer.values, layer.positions, layer.offsets, layer.lengths,
                            positions, self.num_q_heads)  # [B, Hq, n, D]
            max_length = max_lengths[i] if max_lengths is not None else None
            attended = decode_attention(q, layer.keys, layer.values, layer.offsets, layer.lengths, self.scale, max_length=max_length)
            x = torch.addmm(x, attended.transpose(1, 2).reshape(batch * n, -1), w.out.t())  # x + attn Wo^T
            h = rms_norm(x, w.post_norm, w.post_eps)
            x = torch.addmm(x, silu_mul(F.linear(h, w.gate_up)), w.down.t())  # x + mlp
        cache.next_position += n
        x = x.view(batch, n, -1)
        return attention.logits(self.model, self.norm(x if every_position else x[:, -1]))
