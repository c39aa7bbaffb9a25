"""The reading pipeline: one per-layer step that reads tokens, observes, scores and keeps.

Reading is a list of steps, each feeding some prompt tokens through every layer:
  whole-prompt reading (`prefill`): one step, the whole prompt [prefix][document][question];
  progressive reading (kvcli.compress.progressive): one step per chunk of the document.

For each layer of a step:
  1. attend: the step's tokens attend to this layer's rows kept by earlier steps (none in
     the first step) plus themselves, causally; probe sequences (a scorer's extra observers)
     attend to all of that plus themselves and are then thrown away;
  2. observe: `_observe` builds the scorer's Observation of the candidate rows (the
     document's rows: those kept by earlier steps and this step's), with only what the
     scorer `needs` -- the one place that does;
  3. keep: scores -> the budget policy's rows per head -> the layer's `LayerRows`.
A cross-layer policy (DynamicKV, KVzip's global threshold) re-allocates over the layers
seen so far whenever it is due. Hidden states go on to the next layer from the step's full
attention, as in SnapKV, so the full KV cache of all layers never exists at once: peak
memory is weights + hidden states + one layer's K/V of one step + the kept rows.

The first step attends as one dense causal block (the fastest kernels, and on CUDA the
whole prompt in one fused call, `attention.run_layer_split`); later steps attend head by
head over rows of different lengths.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from kvcli import attention
from kvcli.cache import DEFAULT_HEADROOM, CompressedCache, LayerCache
from kvcli.compress.methods import Press
from kvcli.compress.observation import Observation
from kvcli.compress.scorers import Probe
from kvcli.compress.window import matmul_dtype, split_attention, window_attention, window_probabilities
from kvcli.prompts import PromptLayout

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


# ---- what a layer keeps between steps ---------------------------------------------------


@dataclass
class LayerRows:
    """One layer's kept rows, per KV head: [prefix][document][question, once kept].

    keys are rotated at `pos`; `orig` are original prompt positions; `seen` is the best
    attention each row got so far (what max-reducing scorers such as KVzip keep scoring by).
    """

    keys: list[torch.Tensor]  # per head [n_h, D]
    values: list[torch.Tensor]
    pos: list[torch.Tensor]  # per head [n_h] int64
    orig: list[torch.Tensor]  # per head [n_h] int64
    seen: list[torch.Tensor]  # per head [n_h] fp32

    @classmethod
    def empty(cls, num_heads: int, head_dim: int, like: torch.Tensor) -> "LayerRows":
        e = like.new_zeros(0, head_dim)
        i = torch.zeros(0, dtype=torch.int64, device=like.device)
        f = torch.zeros(0, dtype=torch.float32, device=like.device)
        return cls([e] * num_heads, [e] * num_heads, [i] * num_heads, [i] * num_heads, [f] * num_heads)

    def rows(self) -> int:
        return sum(k.shape[0] for k in self.keys)

    def take(self, h: int, rows: torch.Tensor) -> None:
        rows = rows.to(self.keys[h].device)
        self.keys[h], self.values[h] = self.keys[h][rows], self.values[h][rows]
        self.pos[h], self.orig[h], self.seen[h] = self.pos[h][rows], self.orig[h][rows], self.seen[h][rows]

    def to_layer_cache(self, headroom: int) -> LayerCache:
        return LayerCache.from_heads(self.keys, self.values, [o.to(torch.int32) for o in self.orig], headroom)


# ---- attention for one layer of one step ------------------------------------------------


class _StepAttention:
    """Attention backend for one layer of one step, recording what the observers saw.

    `observed` ends as the observers' reduced attention over [earlier rows][step rows]:
    one [Hkv, n] tensor in the dense first step, else one [n_h + n] tensor per head.
    """

    def __init__(self, rows: LayerRows, length: int, like: torch.Tensor, window: int, reduce: str, group: int, sinks: int, scale: float):
        num_heads, head_dim = len(rows.keys), rows.keys[0].shape[-1]
        self.rows = rows
        self.group = group  # query heads per KV head
        self.sinks = sinks  # the prefix: the first rows of every head, in every softmax a probe with a span scores
        self.span: tuple[int, int] | None = None  # step rows the running probe scores (None: all)
        self.scale = scale  # softmax scale of the observers' attention
        self.dense = rows.rows() == 0
        self.keys = like.new_empty(1, num_heads, length, head_dim)  # [1, Hkv, n, D] this step's rows
        self.values = like.new_empty(1, num_heads, length, head_dim)
        self.length = length
        self.window = window
        self.reduce = reduce
        self.start = 0  # first step position of the chunk being run
        self.probe = False
        self.window_queries: list[torch.Tensor] = []  # [Hq, w, D] pieces of the window
        self.observed: torch.Tensor | list[torch.Tensor | None] | None = None if self.dense else [None] * num_heads

    # the AttentionBackend protocol (kvcli.attention)
    def attend(self, layer_idx, query, key, value, scale):
        if not self.probe:
            stop = self.start + query.shape[2]
            self.keys[:, :, self.start : stop] = key
            self.values[:, :, self.start : stop] = value
            self._keep_window(query)
            if self.dense:
                return _causal(query, self.keys[:, :, :stop], self.values[:, :, :stop], scale)
            return self._attend_heads(query, self.keys[0, :, :stop], self.values[0, :, :stop], scale)
        if self.dense:
            split = self._probe_split(query, self.keys, self.values, key, value, scale)
            if split is not None:
                self._record(split[1])
                return split[0]
            keys = torch.cat([self.keys, key], dim=2)
            self._record(self._probe_attention(query[0], self.keys[0], keys[0], key.shape[2], scale))
            return _causal(query, keys, torch.cat([self.values, value], dim=2), scale)
        return self._attend_heads(query, torch.cat([self.keys[0], key[0]], dim=1), torch.cat([self.values[0], value[0]], dim=1), scale, probe=True)

    def _probe_split(self, query, keys, values, key, value, scale):
        """A probe's attention as `split_attention` pieces: [the rows its scoring softmax
        sees][the probe itself, causal][the other rows]; the first two pieces' log-sum-exp is
        the scoring's, so it needs no fused call of its own. keys/values [1, H, S, D]: the
        rows the probe sees (H = 1 for one head of a later step), key/value [1, H, n, D] its
        own. Returns (attention out, the probe's reduced attention [H, S]), or None off the
        CPU (the caller attends in one call as before)."""
        rows = keys.shape[2]
        dtype = matmul_dtype(query)  # cast once, before any rows are picked out
        keys, values, key, value = keys.to(dtype), values.to(dtype), key.to(dtype), value.to(dtype)
        if self.span is None:
            pieces = [(keys, values, False), (key, value, True)]
        else:
            shift = rows - self.length  # rows kept by earlier steps come before the step's rows
            start, stop = self.span[0] + shift, self.span[1] + shift
            if self.sinks > start:
                return None
            seen = torch.cat([torch.arange(start, stop), torch.arange(self.sinks)]).to(keys.device)
            other = torch.cat([torch.arange(self.sinks, start), torch.arange(stop, rows)]).to(keys.device)
            pieces = [(keys.index_select(2, seen), values.index_select(2, seen), False), (key, value, True),
                      (keys.index_select(2, other), values.index_select(2, other), False)]
        split = split_attention(query, pieces, scale)
        if split is None:
            return None
        out, lses = split
        lse = torch.logaddexp(lses[0], lses[1])[0]  # [Hq, n]: over [scored rows][the probe]
        with_probe = torch.cat([keys, key], dim=2)[0]
        return out, self._probe_attention(query[0], keys[0], with_probe, key.shape[2], scale, lse=lse)

    def _probe_attention(self, queries, visible, with_probe, probe_length, scale, lse=None):
        """A probe's reduced attention over `visible` rows [H, S, D] (probe keys appended in
        `with_probe`) -> [H, S]. With a span, the softmax runs over [sinks][span][probe] only
        and every other row gets 0 (KVzip: a chunk's reconstruction scores its own chunk).
        lse: the probe queries' log-sum-exp over those keys, when already known."""
        rows = visible.shape[1]
        if self.span is None:
            return window_attention(queries, with_probe, scale, rows, self.reduce, columns=rows, lse=lse)
        shift = rows - self.length  # rows kept by earlier steps come before the step's rows
        start, stop = self.span[0] + shift, self.span[1] + shift
        # [span][sinks][probe]: the softmax does not care about the order of its keys, and
        # the span first lets only its columns be scored
        sub = torch.cat([visible[:, start:stop], visible[:, : self.sinks], with_probe[:, rows:]], dim=1)
        scored = window_attention(queries, sub, scale, sub.shape[1] - probe_length, self.reduce, columns=stop - start, lse=lse)
        out = torch.zeros(visible.shape[0], rows, dtype=scored.dtype, device=scored.device)
        out[:, start:stop] = scored
        return out

    def attend_prompt(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Queries of the whole step [1, Hq, n, D], whose keys/values the caller already
        wrote into self.keys/self.values (attention.run_layer_split) -> [1, Hq, n, D]."""
        self.start = 0
        self._keep_window(query)
        return _causal(query, self.keys, self.values, scale)

    def _keep_window(self, query: torch.Tensor) -> None:
        first_window = self.length - self.window
        if self.window and self.start + query.shape[2] > first_window:
            # a copy: a view would keep the whole chunk's queries alive until scoring
            self.window_queries.append(query[0, :, max(first_window - self.start, 0) :].clone())

    def _attend_heads(self, query, step_keys, step_values, scale, probe=False):
        """Each KV head over its own kept rows + step_keys [Hkv, s, D] (no padding)."""
        num_kv, n = step_keys.shape[0], query.shape[2]
        group = query.shape[1] // num_kv
        out = torch.empty_like(query)
        for h in range(num_kv):
            k = torch.cat([self.rows.keys[h], step_keys[h]])  # [S, D]
            v = torch.cat([self.rows.values[h], step_values[h]])
            q = query[0, h * group : (h + 1) * group]  # [G, n, D]
            if probe:
                seen_rows = self.rows.keys[h].shape[0] + self.length
                split = self._probe_split(q.unsqueeze(0), k[None, None, :seen_rows], v[None, None, :seen_rows],
                                          k[None, None, seen_rows:], v[None, None, seen_rows:], scale)
                if split is not None:
                    out[0, h * group : (h + 1) * group] = split[0][0]
                    self._record(split[1][0], h)
                    continue
            out[0, h * group : (h + 1) * group] = F.scaled_dot_product_attention(
                q.unsqueeze(0), k[None, None], v[None, None], attn_mask=_causal_lower_right(n, k.shape[0]), scale=scale, enable_gqa=True
            )[0]
            if probe:
                seen_rows = self.rows.keys[h].shape[0] + self.length
                self._record(self._probe_attention(q, k[:seen_rows].unsqueeze(0), k.unsqueeze(0), n, scale)[0], h)
        return out

    def observe_window(self) -> None:
        """The window's attention over every row it can see (after the layer has run)."""
        scale = self.scale
        if not self.window_queries:
            return
        queries = torch.cat(self.window_queries, dim=1)  # [Hq, W, D]
        if self.dense:
            self._record(window_attention(queries, self.keys[0], scale, self.length - queries.shape[1], self.reduce))
            return
        group = queries.shape[0] // len(self.rows.keys)
        for h in range(len(self.rows.keys)):
            k = torch.cat([self.rows.keys[h], self.keys[0, h]])
            q = queries[h * group : (h + 1) * group]
            self._record(window_attention(q, k.unsqueeze(0), scale, k.shape[0] - q.shape[1], self.reduce)[0], h)

    def _record(self, seen: torch.Tensor, head: int | None = None) -> None:
        prior = self.observed if head is None else self.observed[head]
        if prior is not None:
            seen = torch.maximum(prior, seen) if self.reduce == "max" else prior + seen
        if head is None:
            self.observed = seen
        else:
            self.observed[head] = seen


def _causal_lower_right(queries: int, keys: int):
    # Imported here: torch.nn.attention.bias imports torch._dynamo (1.2 s on a 2-core CPU),
    # which a follow-up from a .kvc file never needs.
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(queries, keys)


def _causal(query, keys, values, scale):
    n = query.shape[2]
    if n == keys.shape[2]:  # the whole step at once: plain causal, the fastest kernels
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    mask = _causal_lower_right(n, keys.shape[2])
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- one step ---------------------------------------------------------------------------


@dataclass
class Step:
    """Tokens fed through every layer at once, and what to keep of them.

    ids = [prefix, first step only][document chunk][tail: the question part, or nothing].
    """

    ids: list[int]
    first_position: int  # the position ids[0] gets (compact positions after earlier steps)
    orig: torch.Tensor  # [len(ids)] original prompt position of each token
    new_prefix: int  # prefix tokens at the start of ids (always kept)
    chunk_tokens: int  # prefix + document tokens of ids (the tail comes after)
    window: int  # trailing tokens of ids that observe (SnapKV's window)
    probes: list[Probe]  # observer sequences run after ids and discarded
    keep_tail: bool  # whether the tail's rows stay in the cache (the question, in the last step)


@dataclass
class Reading:
    """What the step loop accumulates; `read_steps` returns it."""

    rows: list[LayerRows]
    hidden_last: torch.Tensor | None = None  # [1, 1, E] last token's hidden state of the last step
    compression_seconds: float = 0.0
    peak_rows: int = 0  # most K/V rows one layer held at once: kept + step (+ probe)
    # [L][Hkv] the last step's score of each document row it kept, in row order (None
    # without a scorer); after a whole-prompt read, the scores of the cache's document rows
    kept_scores: list[list[torch.Tensor]] | None = None


def _observe(scorer, backend: _StepAttention, step: Step, layer, head: int | None, cand: torch.Tensor, seen: torch.Tensor | None,
             layer_idx: int, num_layers: int, budget: float) -> Observation:
    """The Observation of candidate rows `cand` of one head (or of all heads when head is None).

    Candidates index the merged rows [earlier kept rows][step rows] of that head (the
    same indices for every head in the dense first step). Only `scorer.needs` is computed.
    """
    needs, rows, group = scorer.needs, backend.rows, backend.group
    obs = Observation(layer_idx, num_layers, len(rows.keys) if head is None else 1, group, len(cand), budget)
    device = backend.keys.device
    cand = cand.to(device)

    def merged(stored: list[torch.Tensor], step_rows: torch.Tensor) -> torch.Tensor:  # [H, T, ...]
        if head is None:
            return step_rows[:, cand]
        return torch.cat([stored[head], step_rows[head]])[cand].unsqueeze(0)

    def own_query_heads(per_query_head: torch.Tensor) -> torch.Tensor:
        return per_query_head if head is None else per_query_head[head * group : (head + 1) * group]

    if "attention" in needs:
        obs.attention = seen
    if "keys" in needs:
        obs.keys = merged(rows.keys, backend.keys[0])
    if "values" in needs:
        obs.values = merged(rows.values, backend.values[0])
    if "attention_rows" in needs and backend.window_queries:
        queries = own_query_heads(torch.cat(backend.window_queries, dim=1))  # [H*G, W, D]
        keys = backend.keys[0] if head is None else torch.cat([rows.keys[head], backend.keys[0, head]]).unsqueeze(0)
        window = queries.shape[1]
        probs = window_probabilities(queries, keys, backend.scale, keys.shape[1] - window)
        obs.window_share = probs[:, :, -window:].sum(-1).view(obs.num_kv_heads, -1).mean(-1)
        probs = probs[:, :, cand]
        obs.attention_rows = probs.view(obs.num_kv_heads, group, *probs.shape[1:])
    if "queries" in needs and backend.window_queries:
        obs.queries = own_query_heads(torch.cat(backend.window_queries, dim=1))
    if "o_proj" in needs:
        weight = layer.self_attn.o_proj.weight  # [E, Hq*D]
        obs.o_proj = own_query_heads(weight.view(weight.shape[0], -1, backend.keys.shape[-1]).transpose(0, 1))  # [Hq, E, D]
    if "positions" in needs:
        orig = step.orig.to(device)
        obs.positions = orig[cand] if head is None else torch.cat([rows.orig[head], orig])[cand]
    return obs


def _keep(backend: _StepAttention, step: Step, scorer, policy, budget: float, cap: int | None, layer, layer_idx: int,
          num_layers: int, prefix: int) -> list[torch.Tensor]:
    """Score the candidates of every head, keep the policy's choice; returns the kept
    candidates' scores per head (what a cross-layer policy re-allocates by)."""
    rows = backend.rows
    num_kv = len(rows.keys)
    device = backend.keys.device
    n_new = len(step.ids)
    tail = n_new - step.chunk_tokens
    if backend.dense:  # every head has the same candidates: observe and score them at once
        cand = torch.arange(step.new_prefix, step.chunk_tokens)
        seen = backend.observed[:, step.new_prefix : step.chunk_tokens].float() if backend.observed is not None else None
        # Scores stay on the device: sorting 8 heads x 128K tokens per layer on the CPU
        # costs more than the layer's attention.
        scores = scorer.score(_observe(scorer, backend, step, layer, None, cand, seen, layer_idx, num_layers, budget)).float().to(device)
        chosen = policy.select(layer_idx, num_layers, scores, budget)
        cand_rows, cand_scores = [cand] * num_kv, [scores[h] for h in range(num_kv)]
        new_seen = [backend.observed[h].float() if backend.observed is not None else torch.zeros(n_new, device=device) for h in range(num_kv)]
    else:  # heads keep different rows: observe and score one head at a time
        cand_rows, cand_scores, new_seen = [], [], []
        for h in range(num_kv):
            n_h = rows.keys[h].shape[0]
            observed = backend.observed[h]
            seen = torch.cat([rows.seen[h], torch.zeros(n_new, device=device)])
            if observed is not None:
                observed = observed.float()
                seen = torch.maximum(seen, observed) if scorer.reduce == "max" else observed
            cand = torch.cat([torch.arange(min(prefix, n_h), n_h), torch.arange(n_h + step.new_prefix, n_h + step.chunk_tokens)])
            obs_seen = seen[cand.to(device)].float().cpu().unsqueeze(0) if observed is not None else None
            # on the CPU, like the candidates: one head's scores are small, and scorers that read
            # keys or values compute theirs on the device
            cand_scores.append(scorer.score(_observe(scorer, backend, step, layer, h, cand, obs_seen, layer_idx, num_layers, budget)).float().reshape(-1).cpu())
            cand_rows.append(cand)
            new_seen.append(seen)
        width = max(len(s) for s in cand_scores)
        padded = torch.full((num_kv, width), float("-inf"))
        for h, s in enumerate(cand_scores):
            padded[h, : len(s)] = s
        chosen = policy.select(layer_idx, num_layers, padded, budget)
    kept_scores = []
    for h in range(num_kv):
        total = rows.keys[h].shape[0] + n_new
        c = chosen[h]
        c = c[c < len(cand_scores[h])]
        if cap is not None and len(c) > cap:  # positions: no head keeps more than `cap` document rows
            c = c[cand_scores[h][c].topk(cap).indices]
        c = torch.sort(c).values
        kept_scores.append(cand_scores[h][c].cpu())
        keep_tail = torch.arange(total - tail, total) if step.keep_tail else torch.zeros(0, dtype=torch.int64)
        # merge this step's rows after the kept ones, then keep [prefix][chosen][tail]
        rows.keys[h] = torch.cat([rows.keys[h], backend.keys[0, h]])
        rows.values[h] = torch.cat([rows.values[h], backend.values[0, h]])
        positions = torch.arange(step.first_position, step.first_position + n_new, device=device)
        rows.pos[h] = torch.cat([rows.pos[h], positions])
        rows.orig[h] = torch.cat([rows.orig[h], step.orig.to(device)])
        rows.seen[h] = new_seen[h]
        rows.take(h, torch.cat([torch.arange(prefix), cand_rows[h][c.cpu()], keep_tail]))
    return kept_scores


def _reallocate(policy, rows: list[LayerRows], candidate_scores: list[list[torch.Tensor]], budget: float, prefix: int, kept_tail: int) -> None:
    """A cross-layer re-allocation: trim every layer seen so far to its new share of the
    document rows (the prefix and a kept question stay)."""
    survivors = policy.reallocate(candidate_scores, budget)
    for l, heads in enumerate(survivors):
        for h, kept in enumerate(heads):
            n = rows[l].keys[h].shape[0]
            m = n - prefix - kept_tail
            rows[l].take(h, torch.cat([torch.arange(prefix), prefix + kept.cpu(), torch.arange(prefix + m, n)]))
        candidate_scores[l] = [c[k.cpu()] for k, c in zip(heads, candidate_scores[l])]


@torch.inference_mode()
def read_steps(model, steps: Iterable[Step], total_steps: int, press: Press, budget: float | None, *, prefix: int, cap: int | None = None,
               chunk_size: int = DEFAULT_CHUNK, whole_attention: bool | None = None,
               between_steps: Callable[[list[LayerRows], Step], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Reading:
    """Run `steps` (total_steps of them) through every layer, keeping what `press` chooses.

    Steps may be generated lazily: a step's positions can depend on what the step before
    kept (progressive reading).
    budget None: keep everything. cap: most document rows a head may keep (progressive
    reading bounds positions with it). between_steps(rows, step) runs after each step
    (progressive reading re-indexes positions there).
    """
    num_layers, num_kv, head_dim = attention.cache_shape(model)
    group = model.config.num_attention_heads // num_kv
    device = next(model.parameters()).device
    embed, layers, norm, _, _ = attention.parts(model)
    scorer = press.scorer if budget is not None else None
    policy = press.policy
    reduce = scorer.reduce if scorer is not None else "sum"
    cross_layer = getattr(policy, "cross_layer", False) and scorer is not None
    if whole_attention is None:
        # One fused causal call over the whole prompt: flash kernels on CUDA and on the CPU
        # alike, so memory stays linear in length (measured on this CPU: 17.1 -> 14.3 s for
        # the sample PDF in float32, 7.1 -> 5.4 s in bfloat16 autocast).
        whole_attention = True
    whole_attention = whole_attention and attention.is_prenorm_layer(layers[0])

    reading: Reading | None = None
    scale = head_dim**-0.5
    work, done = total_steps * num_layers, 0
    for step in steps:
        if reading is None:
            like = embed(torch.tensor([[step.ids[0]]], device=device))[0]
            reading = Reading(rows=[LayerRows.empty(num_kv, head_dim, like) for _ in range(num_layers)])
        n = len(step.ids)
        positions = torch.arange(step.first_position, step.first_position + n, device=device).unsqueeze(0)
        hidden = embed(torch.tensor([step.ids], device=device))  # [1, n, E]
        probes = [embed(torch.tensor([p.ids], device=device)) for p in step.probes]  # [1, P, E] each
        probe_positions = [torch.arange(step.first_position + n, step.first_position + n + len(p.ids), device=device).unsqueeze(0) for p in step.probes]
        candidate_scores: list[list[torch.Tensor]] = []
        for layer_idx in range(num_layers):
            rows = reading.rows[layer_idx]
            backend = _StepAttention(rows, n, hidden, step.window if scorer is not None else 0, reduce, group, prefix, scale)
            with attention.using(backend):
                if backend.dense and whole_attention:
                    attention.run_layer_split(model, layer_idx, hidden, positions, chunk_size, backend)
                elif backend.dense:
                    for start in range(0, n, chunk_size):
                        backend.start = start
                        stop = min(start + chunk_size, n)
                        # In place is safe: later chunks read only their own slice of the input.
                        hidden[:, start:stop] = attention.run_layer(model, layer_idx, hidden[:, start:stop], positions[:, start:stop])
                else:
                    hidden = attention.run_layer(model, layer_idx, hidden, positions)
                if scorer is not None:
                    backend.probe = True
                    for i, probe in enumerate(probes):
                        span = step.probes[i].span
                        backend.span = None if span is None else (step.new_prefix + span[0], step.new_prefix + span[1])
                        probes[i] = attention.run_layer(model, layer_idx, probe, probe_positions[i])
            reading.peak_rows = max(reading.peak_rows, rows.rows() + num_kv * (n + max((len(p.ids) for p in step.probes), default=0)))
            _sync(device)
            tick = time.perf_counter()
            if scorer is None:
                for h in range(num_kv):
                    rows.keys[h], rows.values[h] = backend.keys[0, h], backend.values[0, h]
                    rows.pos[h] = positions[0]
                    rows.orig[h] = step.orig.to(device)
                    rows.seen[h] = torch.zeros(n, device=device)
            else:
                backend.observe_window()
                kept = _keep(backend, step, scorer, policy, budget, cap, layers[layer_idx], layer_idx, num_layers, prefix)
                candidate_scores.append(kept)
                if cross_layer and policy.due(layer_idx, num_layers):
                    _reallocate(policy, reading.rows[: layer_idx + 1], candidate_scores, budget, prefix, n - step.chunk_tokens if step.keep_tail else 0)
            del backend
            _sync(device)
            reading.compression_seconds += time.perf_counter() - tick
            done += 1
            if progress is not None:
                progress(done, work)
        if between_steps is not None:
            tick = time.perf_counter()
            between_steps(reading.rows, step)
            reading.compression_seconds += time.perf_counter() - tick
        # the scores of the rows this step kept (a re-allocation above trimmed them with the rows)
        reading.kept_scores = candidate_scores if scorer is not None else None
        reading.hidden_last = norm(hidden[:, -1:])  # one token: cheap to keep for every step
        del hidden, probes
    return reading


@torch.inference_mode()
def finish(model, reading: Reading, *, next_position: int, original_length: int, document_tokens: int, compressed: bool,
           started: float, headroom: int) -> PrefillResult:
    """The cache and the numbers a read reports, from the rows every layer kept."""
    num_layers, num_kv, head_dim = attention.cache_shape(model)
    device = reading.rows[0].keys[0].device
    last_logits = attention.logits(model, reading.hidden_last)[0, -1]
    layers = []
    for i, rows in enumerate(reading.rows):
        layers.append(rows.to_layer_cache(headroom))
        reading.rows[i] = None  # free each layer's per-head rows as soon as it is flat
    _sync(device)
    cache = CompressedCache(layers=layers, next_position=torch.tensor([next_position], device=device), original_length=original_length)
    prompt_other = original_length - document_tokens
    return PrefillResult(
        cache=cache,
        last_logits=last_logits,
        compression_seconds=reading.compression_seconds,
        prefill_seconds=time.perf_counter() - started,
        full_bytes=num_layers * num_kv * original_length * head_dim * 2 * layers[0].keys.element_size(),
        compressed=compressed,
        layer_kept=[[int(n) - prompt_other for n in layer.lengths[0].tolist()] for layer in layers],
    )


@torch.inference_mode()
def prefill(model, layout: PromptLayout, press: Press, *, chunk_size: int = DEFAULT_CHUNK, headroom: int = DEFAULT_HEADROOM,
            progress: Callable[[int, int], None] | None = None, whole_attention: bool | None = None) -> PrefillResult:
    """Read the whole prompt (prefix + document [+ question]) in one step and compress it.

    whole_attention: attention over the whole prompt in one fused causal call, only the
    MLP chunked (the default: memory stays linear in length); otherwise both are chunked.
    """
    started = time.perf_counter()
    ids = layout.all_ids
    doc_start, doc_stop = layout.document_range
    budget = press.budget_for(doc_stop - doc_start)
    scorer = press.scorer if budget is not None else None
    step = Step(
        ids=ids,
        first_position=0,
        orig=torch.arange(len(ids)),
        new_prefix=doc_start,
        chunk_tokens=doc_stop,
        window=scorer.window(layout) if scorer is not None and scorer.observes else 0,
        probes=scorer.probes(layout, layout.tokenizer) if scorer is not None and scorer.observes else [],
        keep_tail=True,
    )
    reading = read_steps(model, [step], 1, press, budget, prefix=doc_start, chunk_size=chunk_size, whole_attention=whole_attention, progress=progress)
    result = finish(model, reading, next_position=len(ids), original_length=len(ids), document_tokens=doc_stop - doc_start,
                    compressed=scorer is not None, started=started, headroom=headroom)
    # Only a whole-prompt read records its scores: one step sees the whole document, so the
    # scores do not depend on the budget (progressive reading's later chunks attend to what
    # earlier ones kept, and its positions are compact: a subset is not what reading again gives).
    if reading.kept_scores is not None:
        result.cache.scores = row_scores(result.cache, reading.kept_scores, prefix=doc_start, tail=len(ids) - doc_stop)
    return result


# ---- a heavier cache from a lighter one, by the same scores ------------------------------


def row_scores(cache: CompressedCache, kept_scores: list[list[torch.Tensor]], *, prefix: int, tail: int) -> list[torch.Tensor] | None:
    """Per layer, the flat [sum of lengths] float32 CPU scores of `cache`'s rows: +inf for the
    `prefix` and `tail` rows every head keeps, kept_scores[l][h] for its document rows.
    None if they do not line up with the rows (nothing is guessed)."""
    if len(kept_scores) != len(cache.layers):
        return None
    out = []
    for layer, heads in zip(cache.layers, kept_scores):
        lengths = layer.lengths[0].tolist()
        if len(heads) != len(lengths):
            return None
        parts = []
        for n, scores in zip(lengths, heads):
            if n != prefix + scores.numel() + tail:
                return None
            parts += [torch.full((prefix,), math.inf), scores.detach().float().cpu().reshape(-1), torch.full((tail,), math.inf)]
        out.append(torch.cat(parts) if parts else torch.zeros(0))
    return out


def _budget_free(scorer) -> bool:
    """Whether the scorer's scores ignore the budget (then a read at any ratio gives the same
    scores). CriticalKV and DefensiveKV shape theirs by it (kvcli.compress.critical)."""
    from kvcli.compress.knorm import Knorm
    from kvcli.compress.scorers import KVzip, RandomScorer, SnapKV, Streaming

    return type(scorer) in (KVzip, SnapKV, Streaming, RandomScorer, Knorm)


def derivable(held: Press, target: Press) -> bool:
    """Whether a cache read with `held` can give, by selection alone, exactly the cache a read
    with `target` gives: the same method and scorer, scores that ignore the budget, and a
    nested allocation: each head its own top-k (any layer schedule), or KVzip's one global
    threshold over per-head candidates. Ada-KV's head allocation and DynamicKV's progressive
    re-allocations are not nested (a smaller budget can keep a row a larger one dropped):
    those are read again."""
    from kvcli.compress.budgets import CrossLayerPolicy, Policy

    if held.name != target.name or target.scorer is None or held.scorer != target.scorer or held.policy != target.policy:
        return False
    if not _budget_free(target.scorer):
        return False
    policy = target.policy
    if isinstance(policy, CrossLayerPolicy):
        return policy.mode == "global"
    return isinstance(policy, Policy) and policy.heads == "uniform"


@torch.inference_mode()
def derive(cache: CompressedCache, held: Press, target: Press, *, prefix: int, document_tokens: int,
           headroom: int | None = None) -> CompressedCache | None:
    """The cache a whole-prompt read with `target` would give, selected from `cache` (read
    with `held`, a lighter budget, its `scores` recorded) with no model pass; None when it
    cannot be had exactly from the rows held (then read again).

    Why a subset is exact: with budget-free scores every read ranks a head's document rows
    the same way, and under both allocations `derivable` allows, each head keeps a prefix of
    its own ranking. Per-head top-k: the top k' < k of the top k are the top k'. KVzip's
    global threshold: the candidates are each head's top `cap`; what `cache` holds of a head
    is the top of that ranking, and every candidate it does not hold scored below every row
    it does (it lost the lighter threshold); so if the held rows among the new candidates
    number at least the new total, the new global top-k is among them. The rows keep their
    order, keys, values and positions; the prefix and a kept question stay.
    """
    from kvcli.compress.budgets import CrossLayerPolicy

    if cache.scores is None or cache.batch_size != 1 or not derivable(held, target):
        return None
    budget = target.budget_for(document_tokens)
    held_budget = held.budget_for(document_tokens)
    if budget is None or held_budget is None or held_budget < budget:
        return None  # the target keeps rows the held cache may not have
    num_layers = len(cache.layers)
    tail = cache.original_length - prefix - document_tokens
    if tail < 0 or len(cache.scores) != num_layers:
        return None
    pools: list[list[torch.Tensor]] = []  # [L][Hkv] scores of the held document rows, row order
    for layer, flat in zip(cache.layers, cache.scores):
        lengths = layer.lengths[0].tolist()
        if flat.numel() != sum(lengths):
            return None
        heads, start = [], 0
        for n in lengths:
            if n < prefix + tail:
                return None
            heads.append(flat[start + prefix : start + n - tail].float())
            start += n
        pools.append(heads)
    policy = target.policy
    chosen: list[list[torch.Tensor]] = []  # [L][Hkv] sorted indices into the pools
    if isinstance(policy, CrossLayerPolicy):
        cap = policy.cap(budget, document_tokens)
        candidates = [[torch.sort(s.topk(min(cap, s.numel())).indices).values for s in heads] for heads in pools]
        candidate_scores = [[s[c] for s, c in zip(heads, cands)] for heads, cands in zip(pools, candidates)]
        total = round(budget * len(pools[0]) * num_layers)
        if sum(c.numel() for cands in candidates for c in cands) < total:
            return None  # a fresh read would keep candidates this cache dropped
        survivors = policy.reallocate(candidate_scores, budget)
        chosen = [[c[k] for c, k in zip(cands, kept)] for cands, kept in zip(candidates, survivors)]
    else:
        for l, heads in enumerate(pools):
            # padded to the document's length, so the layer's count is the one a read computes
            padded = torch.full((len(heads), document_tokens), float("-inf"))
            for h, s in enumerate(heads):
                padded[h, : s.numel()] = s
            picked = policy.select(l, num_layers, padded, budget)
            if any(bool((p >= s.numel()).any()) for p, s in zip(picked, heads)):
                return None  # a head needs more rows than it holds
            chosen.append([torch.sort(p).values for p in picked])
    layers, scores = [], []
    for l, layer in enumerate(cache.layers):
        lengths = layer.lengths[0].tolist()
        free = int((layer.capacity_per_head - layer.lengths[0]).min()) if lengths else 0
        keys, values, positions, flat_scores = [], [], [], []
        start = 0
        for h, n in enumerate(lengths):
            rows = torch.cat([torch.arange(prefix), prefix + chosen[l][h].cpu().long(), torch.arange(n - tail, n)])
            k, v, p = layer.head_rows(0, h)
            device_rows = rows.to(k.device)
            keys.append(k[device_rows])
            values.append(v[device_rows])
            positions.append(p[device_rows])
            flat_scores.append(cache.scores[l][start + rows])
            start += n
        layers.append(LayerCache.from_heads(keys, values, positions, free if headroom is None else headroom))
        scores.append(torch.cat(flat_scores))
    return CompressedCache(layers, cache.next_position.clone(), cache.original_length, scores)
