"""Llama-family decoding without transformers: a follow-up from a .kvc file starts fast.

Importing transformers costs ~2.8 s on a 2-core CPU before any work (its activations and
masking modules import torch._dynamo), more than the whole rest of a follow-up question
(load the converted weights, load the .kvc, prefill the question, first token: ~0.5 s).
A follow-up never reads a document, so it needs only the decoder's arithmetic over the
compressed cache: this module is that arithmetic in plain torch, gpt-fast style, with the
same module names and call signatures as transformers' Llama (kvcli.attention.run_layers
and kvcli.generate drive it unchanged), and a tokenizer on the `tokenizers` library with
the chat template rendered by jinja2 as transformers renders it.

It is a second implementation of the model, so it is kept narrow and checked against the
first: `llama` models with the default or llama3 RoPE, SiLU, no q/k norms; anything else
(or a converted copy not made yet) loads through transformers. tests/test_plain.py holds
logits, tokens, templates and whole answers equal to the transformers path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from kvcli import attention

ROPE_TYPES = ("default", "llama3")


# ---- the config (config.json as attributes, what kvcli reads of a transformers config) ----


def rope_parameters(config: SimpleNamespace) -> dict:
    """RoPE settings from a transformers 5 config (rope_parameters) or a 4.x one (rope_theta, rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def unsupported_reason(config: SimpleNamespace) -> str | None:
    """Why this model must load through transformers (None: the plain path matches it)."""
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"RoPE type {rope.get('rope_type')!r}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    return None


# ---- the model: transformers' Llama arithmetic, op for op -----------------------------------


class Linear(nn.Module):
    """nn.Linear's arithmetic without its initialisation: on the meta device nn.Linear and
    nn.Embedding draw random values through torch's reference ops, which import
    torch._dynamo (1.6 s): the weights are assigned from the file anyway."""

    def __init__(self, inputs: int, outputs: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(outputs), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, count: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def inverse_frequencies(config: SimpleNamespace, head_dim: int) -> torch.Tensor:
    rope = rope_parameters(config)
    base = float(rope.get("rope_theta", 10000.0))
    # On the CPU even while the model is built on the meta device (its weights come from the file; this is computed)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / head_dim))
    if rope.get("rope_type", "default") == "llama3":  # Llama 3.1: long wavelengths stretched by `factor`
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    def __init__(self, config: SimpleNamespace, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config, head_dim), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv.float() @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: SimpleNamespace, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.scaling = head_dim**-0.5
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(heads * head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, n, _ = x.shape
        shape = (batch, n, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        backend = attention.active_backend()
        if backend is None:
            raise RuntimeError("the plain model attends only over a kvcli cache (inside attention.using)")
        out = backend.attend(self.layer_idx, q, k, v, self.scaling)  # [B, Hq, n, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, -1))


class MLP(nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(hidden, inner, bias=bias)
        self.up_proj = Linear(hidden, inner, bias=bias)
        self.down_proj = Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: SimpleNamespace, layer_idx: int, head_dim: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, head_dim)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, *, position_embeddings, **_) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), position_embeddings)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Decoder(nn.Module):
    def __init__(self, config: SimpleNamespace, head_dim: int):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, head_dim) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config, head_dim)


class PlainLlama(nn.Module):
    """LlamaForCausalLM's modules and names, for decoding over a kvcli cache only."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.model = Decoder(config, head_dim)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = SimpleNamespace(eos_token_id=getattr(config, "eos_token_id", None))

    def get_input_embeddings(self) -> Embedding:
        return self.model.embed_tokens


def stop_token_ids(local: Path, config: SimpleNamespace):
    """eos_token_id as transformers' generation config has it: generation_config.json's
    (Llama 3.1 lists three) where the folder has one, else the model config's."""
    try:
        return json.loads((local / "generation_config.json").read_text()).get("eos_token_id", config.eos_token_id)
    except (OSError, ValueError, AttributeError):
        return getattr(config, "eos_token_id", None)


def load_weights(local: Path, dtype: torch.dtype) -> PlainLlama | None:
    """The model of a converted folder (config.json + one model.safetensors), None where the
    plain path does not apply (kvcli.models then loads through transformers)."""
    from safetensors.torch import load_file

    weights = local / "model.safetensors"
    try:
        config = SimpleNamespace(**json.loads((local / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not weights.is_file() or unsupported_reason(config) is not None:
        return None
    with torch.device("meta"):
        model = PlainLlama(config)
    state = load_file(str(weights))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]  # stored once (safetensors' save_model)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if set(state) != {name for name, _ in model.named_parameters(remove_duplicate=False)}:
        return None
    cast = {}
    for name, tensor in state.items():  # one cast per stored tensor: tied weights stay one tensor
        cast.setdefault(tensor.data_ptr(), tensor.to(dtype))
    model.load_state_dict({name: cast[t.data_ptr()] for name, t in state.items()}, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config.eos_token_id = stop_token_ids(local, config)
    return model.eval()


# ---- the tokenizer ------------------------------------------------------------------------


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class PlainTokenizer:
    """What kvcli calls of a transformers tokenizer, on `tokenizers` and jinja2."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, local: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(local / "tokenizer.json"))
        settings = json.loads((local / "tokenizer_config.json").read_text())
        self.special = {name: _token_text(settings.get(name)) for name in self.SPECIAL}
        self.clean_up_spaces = bool(settings.get("clean_up_tokenization_spaces", False))
        template = local / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else settings.get("chat_template")
        eos = self.special["eos_token"]
        self.eos_token_id = self._tokenizer.token_to_id(eos) if eos else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """The template rendered as transformers renders it: a sandboxed jinja2 environment
        with trim_blocks, lstrip_blocks and loop controls, tojson and raise_exception."""
        if tokenize:
            raise ValueError("the plain tokenizer renders templates as text only")
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                               **{k: v for k, v in self.special.items() if v is not None})
