"""The kvpress side of `kvcli.benchmarks.crosscheck`: run in kvpress's own virtual env.

Imports only torch, transformers and kvpress (kvpress pins transformers<5.3, kvcli needs
newer), never kvcli. Reads a JSON job (model directory, runs) and writes, per run, the
original positions each (layer, KV head) keeps, as JSON:

    python crosscheck_kvpress.py job.json out.json

Kept positions are read back from kvpress itself: for presses that gather (SnapKV,
StreamingLLM) by matching the compressed cache's key rows against the full cache's; for
presses that mask (Ada-KV, KVzip) as the complement of `module.masked_key_indices`.

Some runs deliberately move kvpress onto kvcli's settings (see crosscheck.py for the list);
each such change is a small subclass below, named after what it changes.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from kvpress import AdaKVPress, KVzipPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, DynamicCache


@dataclass
class SnapKVNoPadPress(SnapKVPress):
    """SnapKV with the edge of the pooling averaged over real tokens only (count_include_pad=False)."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        bsz, num_kv, k_len, _ = keys.shape
        group = module.config.num_attention_heads // num_kv
        attn = self.compute_window_attention(module, hidden_states, keys, self.window_size, kwargs["position_embeddings"])
        scores = attn.mean(dim=-2)  # [B, Hq, T-W]
        scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=False)
        scores = scores.view(bsz, num_kv, group, k_len - self.window_size).mean(2)
        return F.pad(scores, (0, self.window_size), value=scores.max().item() + 1)


@dataclass
class KVzipVariantPress(KVzipPress):
    """KVzipPress with kvcli's departures switched on (all off = stock kvpress).

    reference_prompt: the snu-mllab reference's continuation prompt, which ends "starting
                      with " (a trailing space kvpress's lacks)
    same_prompt:      every chunk's probe starts with the first chunk's prompt
    whole_softmax:    the probe's softmax runs over the whole context + itself, not [sinks,
                      its chunk, itself]; the probe still scores its own chunk only
    max_over_chunks:  (with whole_softmax) every probe scores every context token and a
                      token's score is the max over all probes
    """

    reference_prompt: bool = False
    same_prompt: bool = False
    whole_softmax: bool = False
    max_over_chunks: bool = False

    def prepare(self, model, tokenizer, prev_postfix_size=8):
        pairs = super().prepare(model, tokenizer, prev_postfix_size)
        first_prompt = pairs[0][1][:, : pairs[0][1].shape[1] - pairs[0][0].shape[1]]
        if self.same_prompt:
            return [(chunk, torch.cat([first_prompt, chunk], dim=1)) for chunk, _ in pairs]
        if self.reference_prompt:
            text = "\n\nRepeat the part of the previous context exactly, starting with "
            q = tokenizer.encode(text, return_tensors="pt", add_special_tokens=False)
            return pairs[:1] + [
                (chunk, torch.cat([q, prev[:, -prev_postfix_size:], self._suffix_ids, chunk], dim=1))
                for (prev, _), (chunk, _) in zip(pairs, pairs[1:])
            ]
        return pairs

    def __post_init__(self):
        super().__post_init__()
        if self.max_over_chunks and not self.whole_softmax:
            raise ValueError("max_over_chunks needs whole_softmax: only then does a probe see other chunks")

    def score_kvzip(self, module, hidden_states, keys, values, attentions, kwargs):
        if not self.whole_softmax:
            return super().score_kvzip(module, hidden_states, keys, values, attentions, kwargs)
        saved = (self.n_sink, self.start_idx, self.end_idx)
        # keys [:0] + [0:context_length] + the repeat's own: the whole context and the repeat
        self.n_sink, self.start_idx, self.end_idx = 0, 0, self.context_length
        attn = self._compute_cross_attention(module, hidden_states, keys, kwargs)
        self.n_sink, self.start_idx, self.end_idx = saved
        scores = attn[..., : self.context_length].amax(dim=(-3, -2))  # [B, Hkv, context]
        layer = self.score_val[int(module.layer_idx)]
        if self.max_over_chunks:
            layer[...] = torch.maximum(layer, scores)
        else:
            own = slice(self.start_idx, self.end_idx)
            layer[..., own] = scores[..., own]
        return keys[:, :, : self.context_length], values[:, :, : self.context_length]


def ada_authors_allocation(scores: torch.Tensor, budget: int, alpha: float) -> list[torch.Tensor]:
    """Ada-KV authors' rule (FFY0/AdaKV snapkv_utils.py): c_h from one top-k at the full
    budget, budget_h = round(c_h (1 - alpha) + int(alpha budget)), each head's own top budget_h.
    scores [Hkv, T] (document only) -> kept indices per head."""
    num_heads, length = scores.shape
    winners = scores.flatten().topk(num_heads * budget).indices // length
    counts = torch.bincount(winners, minlength=num_heads).double()
    per_head = torch.round(counts * (1 - alpha) + int(budget * alpha)).long().clamp(max=length)
    order = scores.argsort(dim=-1, descending=True)
    return [torch.sort(order[h, : per_head[h]]).values for h in range(num_heads)]


def ratio_keeping(k_len: int, n_kept: int) -> float:
    """A compression_ratio for which kvpress keeps exactly n_kept of k_len (int(k_len (1 - cr)))."""
    ratio = 1.0 - (n_kept + 0.5) / k_len
    assert int(k_len * (1 - ratio)) == n_kept, (k_len, n_kept, ratio)
    return ratio


def kept_from_gather(full: DynamicCache, compressed: DynamicCache) -> list[list[list[int]]]:
    out = []
    for full_layer, layer in zip(full.layers, compressed.layers):
        heads = []
        for h in range(layer.keys.shape[1]):
            same = (layer.keys[0, h][:, None, :] == full_layer.keys[0, h][None, :, :]).all(-1)  # [n_kept, T]
            assert bool(same.any(-1).all()), "a compressed key row matches no full-cache row"
            heads.append(sorted(same.float().argmax(-1).tolist()))
        out.append(heads)
    return out


def kept_from_mask(model, num_kv: int, length: int) -> list[list[list[int]]]:
    out = []
    for layer in model.model.layers:
        keep = torch.ones(num_kv, length, dtype=torch.bool)
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            _, heads, seqs = masked
            keep[heads.cpu(), seqs.cpu()] = False
        out.append([torch.nonzero(keep[h]).flatten().tolist() for h in range(num_kv)])
    return out


def snapkv_press(spec: dict, length: int) -> SnapKVPress:
    cls = SnapKVPress if spec["press"] == "snapkv" else SnapKVNoPadPress
    ratio = ratio_keeping(length, spec["n_kept"])  # n_kept per head, the window included (kvpress's definition)
    return cls(compression_ratio=ratio, window_size=spec["window"], kernel_size=spec["kernel"])


@torch.inference_mode()
def ada_authors(model, spec: dict) -> list[list[list[int]]]:
    """kvpress computes the SnapKV scores; the head allocation is the Ada-KV authors' rule."""
    ids = torch.tensor([spec["input_ids"]])
    length, window = ids.shape[1], spec["window"]
    press = snapkv_press(spec, length)
    captured: dict[int, torch.Tensor] = {}

    def capture(module, hidden_states, keys, values, attentions, kwargs, _score=press.score):
        scores = _score(module, hidden_states, keys, values, attentions, kwargs)
        captured[int(module.layer_idx)] = scores[0, :, : length - window].float()  # document only
        return scores

    press.score = capture
    with press(model):
        model(ids, past_key_values=DynamicCache())
    kept = []
    for l in range(model.config.num_hidden_layers):
        heads = ada_authors_allocation(captured[l], spec["n_kept"] - window, spec["alpha"])
        kept.append([h.tolist() + list(range(length - window, length)) for h in heads])
    return kept


@torch.inference_mode()
def run(model, spec: dict) -> list[list[list[int]]]:
    """Kept positions [layer][KV head] of one kvpress run."""
    kind = spec["press"]
    if kind == "ada-authors":
        return ada_authors(model, spec)
    ids = torch.tensor([spec["input_ids"]])
    length = ids.shape[1]
    num_layers, num_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    if kind in ("snapkv", "snapkv-nopad"):
        press = snapkv_press(spec, length)
    elif kind == "ada-nopad":
        press = AdaKVPress(snapkv_press(spec, length), alpha_safeguard=spec["alpha"])
    elif kind == "streaming":
        press = StreamingLLMPress(compression_ratio=ratio_keeping(length, spec["n_kept"]), n_sink=spec["n_sink"])
    elif kind == "kvzip":
        total, numel = spec["total_kept"], num_layers * num_kv * length  # over layers x heads x positions
        ratio = (numel - total + 0.5) / numel
        assert numel - int(numel * ratio) == total
        flags = ("reference_prompt", "same_prompt", "whole_softmax", "max_over_chunks")
        press = KVzipVariantPress(compression_ratio=ratio, chunk_size=spec["chunk_size"], **{f: spec.get(f, False) for f in flags})
    else:
        raise ValueError(f"unknown press {kind!r}")

    if isinstance(press, (SnapKVPress, StreamingLLMPress)):  # these gather the kept rows
        full = DynamicCache()
        model(ids, past_key_values=full)
        cache = DynamicCache()
        with press(model):
            model(ids, past_key_values=cache)
        return kept_from_gather(full, cache)
    for layer in model.model.layers:  # these mask (module.masked_key_indices)
        layer.self_attn.masked_key_indices = None
    with press(model):
        model(input_ids=ids, past_key_values=DynamicCache())
    return kept_from_mask(model, num_kv, length)


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzipPress warns about its cost on every run
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    results = {"versions": {"kvpress": importlib.metadata.version("kvpress"),
                            "transformers": transformers.__version__, "torch": torch.__version__}}
    for spec in job["runs"]:
        results[spec["name"]] = {"kept": run(model, spec)}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
