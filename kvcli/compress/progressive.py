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

from kvcli import attention
from kvcli.cache import DEFAULT_HEADROOM
from kvcli.compress.methods import Press
from kvcli.compress.pipeline import (
    DEFAULT_CHUNK,
    LayerRows,
    PrefillResult,
    Step,
    finish,
    read_steps,
)
from kvcli.errors import KvcliError
from kvcli.prompts import PromptLayout

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
    # with preceding tokens: a continuation probe (KVzip's "... starting with") is the longest
    probes = scorer.probes(_step_layout(layout, [0] * chunk, aware), layout.tokenizer, [0] * chunk)
    return max((len(p.ids) for p in probes), default=0)


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
    rotary = attention.parts(model)[3]
    scorer = press.scorer
    aware = bool(layout.question_ids)
    prefix_ids, doc_ids, question_ids = layout.prefix_ids, layout.document_ids, layout.question_ids
    p = len(prefix_ids)
    doc_stop = p + len(doc_ids)
    chunk = the_plan.chunk_size
    starts = list(range(0, len(doc_ids), chunk))
    state = {"next_position": 0, "max_position": 0}
    steps: list[dict] = []

    def step_at(index: int, start: int) -> Step:
        final = index == len(starts) - 1
        chunk_doc = doc_ids[start : start + chunk]
        step_layout = _step_layout(layout, chunk_doc, aware)
        # The question rides along with every chunk as its observation window (question-aware
        # at every step) for scorers that observe, and with the last chunk in any case.
        tail = question_ids if aware and (final or scorer.observes) else []
        chunk_ids = (prefix_ids if index == 0 else []) + chunk_doc
        ids = chunk_ids + tail
        # the chunk before (not the whole prefix): probes need only the few tokens it ends with
        probes = scorer.probes(step_layout, layout.tokenizer, doc_ids[max(0, start - chunk) : start]) if scorer.observes else []
        first = state["next_position"]
        state["max_position"] = max([state["max_position"], first + len(ids) - 1] + [first + len(ids) + len(x.ids) - 1 for x in probes])
        orig = torch.cat([torch.arange(0 if index == 0 else p + start, p + start + len(chunk_doc)), torch.arange(doc_stop, doc_stop + len(tail))])
        return Step(
            ids=ids, first_position=first, orig=orig, new_prefix=p if index == 0 else 0, chunk_tokens=len(chunk_ids),
            window=min(scorer.window(step_layout), len(ids)) if scorer.observes else 0, probes=probes, keep_tail=final and aware,
        )

    def compact(rows: list[LayerRows], step: Step) -> None:
        kept_tail = len(step.ids) - step.chunk_tokens if step.keep_tail else 0
        state["next_position"] = _compact(rows, rotary, p, kept_tail)
        steps.append({
            "chunk": len(steps),
            "document_tokens_read": min(len(doc_ids), (len(steps) + 1) * chunk),
            "rows": sum(r.rows() for r in rows),
            "next_position": state["next_position"],
        })

    started = time.perf_counter()
    reading = read_steps(
        model, (step_at(i, start) for i, start in enumerate(starts)), len(starts), press, the_plan.budget,
        prefix=p, cap=the_plan.cap, between_steps=compact, progress=progress,
    )
    result = finish(model, reading, next_position=state["next_position"], original_length=len(layout.all_ids),
                    document_tokens=len(doc_ids), compressed=True, started=started, headroom=headroom)
    return ProgressiveResult(
        **vars(result), plan=the_plan, compact_length=state["next_position"], max_position=state["max_position"],
        peak_rows=reading.peak_rows, steps=steps,
    )


def _compact(states: list[LayerRows], rotary, p: int, kept_tail: int) -> int:
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
