"""Documents longer than the model's context: progressive reading with eviction.

The idea (InfLLM / StreamingLLM-style chunked reading, with a real scorer): the prompt
[prefix][document] is read in chunks of `chunk_size` tokens. Chunk i runs through every
layer, each layer attending to *its compressed cache of everything before* plus the chunk
itself (causal). Right after, the cache rows and the chunk's rows are scored with the
press's scorer and cut back to the budget with the press's policy (any scorer, any
policy); the prefix (system prompt, chat template) is always kept. So the cache never
holds more than budget + one chunk per head, whatever the document's length.

Observation. With a question (`ask`), the question part is appended after every chunk as
the observation window (question-aware at every step): its queries score the cache and
the chunk, its K/V are thrown away, except after the last chunk where they are kept, as
in the one-shot prefill. Without one (`compress`, `summarize`, `--agnostic`) the scorer's
question-agnostic observation is used on the chunk: SnapKV's window of the chunk's tail
plus its generic probe, KVzip's reconstruction of the chunk ("repeat the previous
context"; a row's score is the max over every step that observed it, so rows keep the
score earned when their own chunk was reconstructed), Streaming's recency, random.

Positions. The model must never see a position beyond its trained range, so rows get
*compact* positions after every step. RoPE attention depends only on the distance
between query and key, and a key rotated at p then multiplied by R(d) is exactly the key
rotated at p + d (R(a)R(b) = R(a+b), per frequency pair; llama3/linear scaling only
rescale the per-pair frequencies, which stay linear in the position), so re-indexing a
stored key is one rotation by its shift: `rotate_keys`. The scheme:

  - prefix rows keep positions 0..p-1 (attention sinks stay where they were trained);
  - each (layer, KV head) keeps its own number m of document rows (Ada-KV, pyramid...),
    in document order, at positions p+M-m .. p+M-1, where M is the most rows any head
    of any layer keeps: *right-aligned*, so the most recent kept tokens of every head
    sit just before the next chunk, as they did in the document; shorter heads have a
    gap after the prefix instead (gaps are harmless: the original text had larger ones);
  - the next chunk continues at p+M for every layer and head, so queries get one
    position per token (transformers rotates a token's query once for all heads), and
    every kept key stays before every new token: causal order is preserved.

Per-token positions shared by all heads (rank in the union of kept tokens) were the
other choice; the union over layers and heads grows with the document (different heads
keep different tokens), so it cannot guarantee a bounded range. Per-head ranks can: M is
at most `cap` (planned so that p + cap + chunk + question/probe fits the context; a head
that Ada-KV would give more is trimmed to its best `cap`).

The result is an ordinary PrefillResult whose cache decodes like any other: keys are
rotated at compact positions, `next_position` is after the compact range, and
`LayerCache.positions` keeps the ORIGINAL prompt position of every kept row (metadata:
the map from document positions, hence pages, to kept tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvcli import attention
from kvcli.compress.budgets import CrossLayerPolicy
from kvcli.cache import DEFAULT_HEADROOM, CompressedCache, LayerCache
from kvcli.errors import KvcliError
from kvcli.compress.methods import Press
from kvcli.compress.prefill import DEFAULT_CHUNK, PrefillResult, _sync
from kvcli.prompts import PromptLayout
from kvcli.compress.scorers import Observation
from kvcli.compress.window import window_attention

# Chunks are never halved below this (or context / 8) when making room for the budget.
MIN_CHUNK = 256
# Question-agnostic: room left in the context for a later question part.
QUESTION_RESERVE = 64


# ---- RoPE re-indexing ------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(rotary, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys [R, D] rotated at positions p -> the same keys rotated at p + delta [R].

    Uses the rotary embedding's own (possibly scaled) inverse frequencies; its output
    scaling (YaRN's attention factor) is already inside the stored keys, so it is not
    applied twice. Computed in fp32, returned in the keys' dtype.
    """
    inv_freq = rotary.inv_freq.to(device=keys.device, dtype=torch.float32)  # [D/2]
    freqs = delta.to(device=keys.device, dtype=torch.float32).unsqueeze(-1) * inv_freq  # [R, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [R, D], the HF (rotate_half) layout
    k = keys.float()
    return (k * angles.cos() + rotate_half(k) * angles.sin()).to(keys.dtype)


# ---- planning ---------------------------------------------------------------------------


@dataclass
class ProgressivePlan:
    context: int  # positions the model may use (model context or --max-context)
    chunk_size: int  # document tokens per step
    budget: float  # mean document tokens kept per KV head after each step
    cap: int  # most document tokens one head may keep (bounds the positions)
    chunks: int
    document_tokens: int
    prompt_tokens: int  # prefix + document (+ question): what a one-shot prefill would read

    def describe(self) -> dict:
        return {
            "context": self.context,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "budget": round(self.budget, 1),
            "cap": self.cap,
        }


def _step_layout(layout: PromptLayout, doc_ids: list[int], aware: bool) -> PromptLayout:
    return PromptLayout(layout.tokenizer, layout.template, layout.prefix_ids, doc_ids, layout.question_ids if aware else [])


def _probe_length(press: Press, layout: PromptLayout, chunk: int, aware: bool) -> int:
    scorer = press.scorer
    if scorer is None or not scorer.observes:
        return 0
    probes = scorer.probes(_step_layout(layout, [0] * chunk, aware), layout.tokenizer)
    return max((len(p) for p in probes), default=0)


def plan(layout: PromptLayout, press: Press, *, context: int, chunk_size: int, answer_tokens: int) -> ProgressivePlan:
    """Chunk size and budget such that no step, and no answer, needs a position >= context.

    A step holds [prefix][<= cap document rows][chunk][question or nothing][probe]; the
    answer needs [prefix][<= cap rows][question][answer_tokens]. The budget is the
    press's (ratio x document or --budget); when it does not fit next to a chunk the
    chunk is halved (down to MIN_CHUNK), then the budget is lowered to what fits.
    """
    aware = bool(layout.question_ids)
    prefix, doc = len(layout.prefix_ids), len(layout.document_ids)
    question = len(layout.question_ids) if aware else QUESTION_RESERVE
    step_tail = len(layout.question_ids)  # the question rides along with (at least) the last chunk

    def room(chunk: int) -> int:
        during = context - prefix - chunk - step_tail - _probe_length(press, layout, chunk, aware)
        final = context - prefix - question - answer_tokens
        return min(during, final)

    requested = press.budget_for(doc) if press.scorer is not None else None
    chunk = max(1, min(chunk_size, doc))
    smallest = min(chunk, max(16, min(MIN_CHUNK, context // 8)))
    while room(chunk) < (requested if requested is not None else 1) and chunk > smallest:
        chunk = max(smallest, chunk // 2)
    cap = room(chunk)
    if cap < 1:
        raise KvcliError(
            f"the context of {context} tokens is too small to read this document in chunks of {chunk} "
            f"(prefix {prefix}, question {question}, answer {answer_tokens} tokens): lower --chunk-size or --max-new-tokens"
        )
    budget = float(cap) if requested is None else min(float(requested), float(cap))
    return ProgressivePlan(
        context=context,
        chunk_size=chunk,
        budget=budget,
        cap=cap,
        chunks=math.ceil(doc / chunk),
        document_tokens=doc,
        prompt_tokens=len(layout.all_ids),
    )


# ---- the per-layer state and the attention backend for one step -------------------------


@dataclass
class _Layer:
    """One layer's compressed cache between steps: per KV head, rows [prefix][document].

    keys are rotated at `pos` (compact positions); `orig` are original prompt positions;
    `seen` the best observation each row got so far (used by max-reducing scorers).
    """

    keys: list[torch.Tensor]  # per head [n_h, D]
    values: list[torch.Tensor]
    pos: list[torch.Tensor]  # per head [n_h] int64
    orig: list[torch.Tensor]  # per head [n_h] int64
    seen: list[torch.Tensor]  # per head [n_h] fp32

    @classmethod
    def empty(cls, num_heads: int, head_dim: int, like: torch.Tensor) -> "_Layer":
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


class _StepAttention:
    """Backend for one layer of one step: the step's tokens, then probes, over the cache.

    Every KV head attends to its own kept rows + the step's rows (no padding: heads keep
    different numbers of rows); observation queries (the last `window` step tokens, then
    the probes) record their attention over [cache rows][step rows] per head.
    """

    def __init__(self, layer: _Layer, window: int, reduce: str):
        self.layer = layer
        self.window = window
        self.reduce = reduce
        self.probe = False
        self.new_keys: torch.Tensor | None = None  # [Hkv, n, D] the step's rows
        self.new_values: torch.Tensor | None = None
        self.observed: list[torch.Tensor | None] = [None] * len(layer.keys)

    def attend(self, layer_idx, query, key, value, scale):
        num_q, num_kv, n = query.shape[1], key.shape[1], query.shape[2]
        group = num_q // num_kv
        if not self.probe:
            self.new_keys, self.new_values = key[0], value[0]
        out = torch.empty_like(query)
        for h in range(num_kv):
            parts_k = [self.layer.keys[h], self.new_keys[h]] + ([key[0, h]] if self.probe else [])
            parts_v = [self.layer.values[h], self.new_values[h]] + ([value[0, h]] if self.probe else [])
            k, v = torch.cat(parts_k), torch.cat(parts_v)  # [S, D]
            q = query[0, h * group : (h + 1) * group]  # [G, n, D]
            out[0, h * group : (h + 1) * group] = F.scaled_dot_product_attention(
                q.unsqueeze(0), k[None, None], v[None, None], attn_mask=causal_lower_right(n, k.shape[0]), scale=scale, enable_gqa=True
            )[0]
            seen_rows = self.layer.keys[h].shape[0] + self.new_keys.shape[1]
            if self.probe:
                seen = window_attention(q, k.unsqueeze(0), scale, k.shape[0] - n, self.reduce)[0, :seen_rows]
            elif self.window:
                w = min(self.window, n)
                seen = window_attention(q[:, n - w :], k.unsqueeze(0), scale, k.shape[0] - w, self.reduce)[0]
            else:
                continue
            prior = self.observed[h]
            if prior is None:
                self.observed[h] = seen
            elif self.reduce == "max":
                self.observed[h] = torch.maximum(prior, seen)
            else:
                self.observed[h] = prior + seen
        return out


# ---- the reader ------------------------------------------------------------------------


@dataclass
class ProgressiveResult(PrefillResult):
    plan: ProgressivePlan | None = None
    compact_length: int = 0  # positions used by the final cache (= next_position)
    max_position: int = 0  # the largest position any query or key got while reading
    peak_rows: int = 0  # most K/V rows held at once by one layer: cache + step (+ probe)
    steps: list[dict] = field(default_factory=list)  # per step: rows kept, positions used


@torch.inference_mode()
def read_progressive(
    model,
    layout: PromptLayout,
    press: Press,
    *,
    context: int,
    chunk_size: int = DEFAULT_CHUNK,
    answer_tokens: int = 256,
    headroom: int = DEFAULT_HEADROOM,
    progress: Callable[[int, int], None] | None = None,
) -> ProgressiveResult:
    """Read prefix + document (+ question) in chunks, compressing after each; see the module doc."""
    if press.scorer is None:
        raise KvcliError("progressive reading needs a compression method (not 'full')")
    the_plan = plan(layout, press, context=context, chunk_size=chunk_size, answer_tokens=answer_tokens)
    num_layers, num_kv, head_dim = attention.cache_shape(model)
    device = next(model.parameters()).device
    embed, _, norm, rotary, _ = attention.parts(model)
    scorer, policy = press.scorer, press.policy
    aware = bool(layout.question_ids)
    reduce = scorer.reduce
    cross_layer = isinstance(policy, CrossLayerPolicy)

    prefix_ids, doc_ids, question_ids = layout.prefix_ids, layout.document_ids, layout.question_ids
    p = len(prefix_ids)
    doc_stop = p + len(doc_ids)
    chunk = the_plan.chunk_size
    starts = list(range(0, len(doc_ids), chunk))
    budget = the_plan.budget
    cap = the_plan.cap

    started = time.perf_counter()
    like = embed(torch.tensor([[prefix_ids[0] if prefix_ids else doc_ids[0]]], device=device))
    states = [_Layer.empty(num_kv, head_dim, like[0]) for _ in range(num_layers)]
    next_pos = 0
    max_position = 0
    peak_rows = 0
    compression_seconds = 0.0
    steps: list[dict] = []
    last_logits = None
    total_work = len(starts) * num_layers

    for step, start in enumerate(starts):
        final = step == len(starts) - 1
        chunk_doc = doc_ids[start : start + chunk]
        new_prefix = p if step == 0 else 0
        chunk_ids = (prefix_ids if step == 0 else []) + chunk_doc
        step_layout = _step_layout(layout, chunk_doc, aware)
        tail = question_ids if aware and (final or scorer.observes) else []
        ids = chunk_ids + tail
        n_chunk, n_new = len(chunk_ids), len(ids)
        window = min(scorer.window(step_layout), n_new) if scorer.observes else 0
        probe_ids = scorer.probes(step_layout, layout.tokenizer) if scorer.observes else []
        positions = torch.arange(next_pos, next_pos + n_new, device=device).unsqueeze(0)
        probe_positions = [torch.arange(next_pos + n_new, next_pos + n_new + len(x), device=device).unsqueeze(0) for x in probe_ids]
        max_position = max([max_position, next_pos + n_new - 1] + [int(x[0, -1]) for x in probe_positions])
        orig_new = torch.cat([
            torch.arange(0 if step == 0 else p + start, p + start + len(chunk_doc)),
            torch.arange(doc_stop, doc_stop + len(tail)),
        ]).to(device)

        hidden = embed(torch.tensor([ids], device=device))
        probes = [embed(torch.tensor([x], device=device)) for x in probe_ids]
        candidate_scores: list[list[torch.Tensor]] = []
        for layer_idx in range(num_layers):
            state = states[layer_idx]
            backend = _StepAttention(state, window, reduce)
            with attention.using(backend):
                hidden = attention.run_layer(model, layer_idx, hidden, positions)
                backend.probe = True
                for i, probe in enumerate(probes):
                    probes[i] = attention.run_layer(model, layer_idx, probe, probe_positions[i])
            peak_rows = max(peak_rows, state.rows() + num_kv * (n_new + max((len(x) for x in probe_ids), default=0)))
            _sync(device)
            tick = time.perf_counter()
            new_state, chosen_scores = _select(
                state, backend, layer_idx, num_layers, scorer, policy, budget, cap,
                p=p, new_prefix=new_prefix, n_chunk=n_chunk, n_new=n_new, keep_tail=final and aware,
                positions=positions[0], orig_new=orig_new,
            )
            states[layer_idx] = new_state
            candidate_scores.append(chosen_scores)
            del backend
            compression_seconds += time.perf_counter() - tick
            if progress is not None:
                progress(step * num_layers + layer_idx + 1, total_work)
        tick = time.perf_counter()
        if cross_layer:
            survivors = policy.reallocate(candidate_scores, budget)
            for state, heads in zip(states, survivors):
                for h, kept in enumerate(heads):
                    m = state.keys[h].shape[0] - p - (len(tail) if final and aware else 0)
                    tail_rows = torch.arange(p + m, state.keys[h].shape[0])
                    state.take(h, torch.cat([torch.arange(p), p + kept.cpu(), tail_rows]))
        kept_tail = len(tail) if final and aware else 0
        next_pos = _compact(states, rotary, p, kept_tail)
        compression_seconds += time.perf_counter() - tick
        steps.append({
            "chunk": step,
            "document_tokens_read": start + len(chunk_doc),
            "rows": sum(s.rows() for s in states),
            "next_position": next_pos,
        })
        if final:
            last_logits = attention.logits(model, norm(hidden[:, -1:]))[0, -1]
        del hidden, probes

    _sync(device)
    layers = [_to_layer_cache(s, headroom) for s in states]
    cache = CompressedCache(layers=layers, next_position=torch.tensor([next_pos], device=device), original_length=len(layout.all_ids))
    length = len(layout.all_ids)
    prompt_other = length - len(doc_ids)
    return ProgressiveResult(
        cache=cache,
        last_logits=last_logits,
        compression_seconds=compression_seconds,
        prefill_seconds=time.perf_counter() - started,
        full_bytes=num_layers * num_kv * length * head_dim * 2 * layers[0].keys.element_size(),
        compressed=True,
        layer_kept=[[int(n) - prompt_other for n in layer.lengths[0].tolist()] for layer in layers],
        plan=the_plan,
        compact_length=next_pos,
        max_position=max_position,
        peak_rows=peak_rows,
        steps=steps,
    )


def _select(state: _Layer, backend: _StepAttention, layer_idx, num_layers, scorer, policy, budget, cap, *,
            p, new_prefix, n_chunk, n_new, keep_tail, positions, orig_new) -> tuple[_Layer, list[torch.Tensor]]:
    """Score [cache document rows][chunk document rows] per head, keep the policy's choice.

    Returns the layer's new state (rows still rotated at their current positions) and,
    per head, the scores of the kept document rows (for cross-layer policies).
    """
    num_kv = len(state.keys)
    device = state.keys[0].device
    all_rows, cand_maps, cand_scores = [], [], []
    for h in range(num_kv):
        n_h = state.keys[h].shape[0]
        total = n_h + n_new
        observed = backend.observed[h]
        seen = torch.cat([state.seen[h], torch.zeros(n_new, device=device)])
        if observed is not None:
            observed = observed.float()
            seen = torch.maximum(seen, observed) if scorer.reduce == "max" else observed
        cand = torch.cat([torch.arange(min(p, n_h), n_h), torch.arange(n_h + new_prefix, n_h + n_chunk)])  # rows of the document
        obs = seen[cand.to(device)].float().cpu().unsqueeze(0) if observed is not None else None
        scores = scorer.score(Observation(layer_idx, obs, len(cand), 1)).float().reshape(-1)
        all_rows.append(total)
        cand_maps.append(cand)
        cand_scores.append(scores)
        # the merged rows of this head: cache rows then the step's rows
        state.keys[h] = torch.cat([state.keys[h], backend.new_keys[h]])
        state.values[h] = torch.cat([state.values[h], backend.new_values[h]])
        state.pos[h] = torch.cat([state.pos[h], positions])
        state.orig[h] = torch.cat([state.orig[h], orig_new])
        state.seen[h] = seen
    width = max(len(s) for s in cand_scores)
    padded = torch.full((num_kv, width), float("-inf"))
    for h, s in enumerate(cand_scores):
        padded[h, : len(s)] = s
    chosen = policy.select(layer_idx, num_layers, padded, budget)
    kept_scores = []
    for h in range(num_kv):
        c = chosen[h]
        c = c[c < len(cand_scores[h])]
        if len(c) > cap:  # positions: no head keeps more than `cap` document rows
            c = torch.sort(c[cand_scores[h][c].topk(cap).indices]).values
        c = torch.sort(c).values
        kept_scores.append(cand_scores[h][c])
        tail = torch.arange(all_rows[h] - (n_new - n_chunk), all_rows[h]) if keep_tail else torch.zeros(0, dtype=torch.int64)
        state.take(h, torch.cat([torch.arange(p), cand_maps[h][c], tail]))
    return state, kept_scores


def _compact(states: list[_Layer], rotary, p: int, kept_tail: int) -> int:
    """Re-index every kept row to compact positions (module doc); returns the next position."""
    most = max(k.shape[0] - p - kept_tail for s in states for k in s.keys)
    for s in states:
        for h in range(len(s.keys)):
            m = s.keys[h].shape[0] - p - kept_tail
            device = s.keys[h].device
            new_pos = torch.cat([
                torch.arange(p), torch.arange(p + most - m, p + most), torch.arange(p + most, p + most + kept_tail)
            ]).to(device)
            delta = new_pos - s.pos[h]
            if bool((delta != 0).any()):
                s.keys[h] = rotate_keys(rotary, s.keys[h], delta)
            s.pos[h] = new_pos
    return p + most + kept_tail


def _to_layer_cache(state: _Layer, headroom: int) -> LayerCache:
    """The flat per-head layout of kvcli.cache; positions = original prompt positions."""
    num_kv = len(state.keys)
    device = state.keys[0].device
    head_dim = state.keys[0].shape[-1]
    counts = torch.tensor([k.shape[0] for k in state.keys], dtype=torch.int64)
    offsets = torch.zeros(num_kv + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts + headroom, 0)
    capacity = int(offsets[-1])
    keys = state.keys[0].new_zeros(1, capacity, head_dim)
    values = state.values[0].new_zeros(1, capacity, head_dim)
    positions = torch.full((1, capacity), -1, dtype=torch.int32, device=device)
    for h in range(num_kv):
        o, n = int(offsets[h]), int(counts[h])
        keys[0, o : o + n] = state.keys[h]
        values[0, o : o + n] = state.values[h]
        positions[0, o : o + n] = state.orig[h].to(torch.int32)
    return LayerCache(keys, values, positions, offsets.to(device, torch.int32), counts.to(device, torch.int32).unsqueeze(0))


def compact_positions(cache: CompressedCache, prefix_tokens: int, kept_tail: int = 0) -> list[list[torch.Tensor]]:
    """Per layer and head, the compact position of every kept row (what its key is rotated at).

    Recomputed from the row counts by the scheme of the module doc: no need to store it.
    """
    end = int(cache.next_position.reshape(-1)[0]) - kept_tail
    out = []
    for layer in cache.layers:
        heads = []
        for h in range(layer.num_kv_heads):
            n = int(layer.lengths[0, h])
            m = n - prefix_tokens - kept_tail
            heads.append(torch.cat([torch.arange(prefix_tokens), torch.arange(end - m, end), torch.arange(end, end + kept_tail)]))
        out.append(heads)
    return out
