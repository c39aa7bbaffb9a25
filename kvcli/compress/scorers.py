"""Scorers: which document tokens matter, one score per (KV head, token) and layer.

A scorer says what it needs to observe (kvcli.compress.observation) and how it turns that
into scores [H, T], higher = keep; the reading pipeline does the observing and a budget
policy does the choosing. Attention observers come from two places:
  - `window`: the last tokens of the prompt itself (SnapKV's observation window: the
    question when the question is known, the document's tail otherwise);
  - `probes`: extra token sequences that attend to the whole prompt and are then thrown
    away (a generic question for question-agnostic SnapKV; KVzip's "repeat the context"
    reconstruction, chunk by chunk).
Their attention probabilities over the prompt's keys are reduced over queries and over
the query heads of each KV group, by sum (SnapKV, Ada-KV) or max (KVzip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcli.compress.observation import Observation
from kvcli.prompts import PromptLayout, encode


@dataclass
class Probe:
    """An observer sequence run after the prompt, through every layer, then thrown away.

    span: the document tokens [start, stop) it scores; its softmax then runs over the
    prefix (the attention sinks), that span and the probe itself, as KVzip's reference
    scores a chunk's reconstruction. None: it scores every prompt token, softmax over all.
    """

    ids: list[int]
    span: tuple[int, int] | None = None


@dataclass
class Scorer:
    """Base: subclasses set `needs` (and `reduce`) and override `score` (and `probes`/`window`)."""

    needs = frozenset({"attention"})
    reduce = "sum"

    @property
    def observes(self) -> bool:
        """Whether observer queries (a window, probes) have to run for this scorer."""
        return bool({"attention", "attention_rows", "queries"} & set(self.needs))

    def window(self, layout: PromptLayout) -> int:
        """How many trailing prompt tokens observe the document."""
        return 0

    def probes(self, layout: PromptLayout, tokenizer, preceding: list[int] = ()) -> list[Probe]:
        """Extra observing sequences, placed after the prompt and discarded after scoring.

        preceding: the document tokens before `layout.document_ids` (progressive reading
        gives each chunk's layout only that chunk)."""
        return []

    def score(self, obs: Observation) -> torch.Tensor:  # [Hkv, T_doc]
        raise NotImplementedError


# The agnostic probe asks for what later questions usually ask for.
GENERIC_PROBE = "List the key facts of the document: names, numbers, amounts, dates and places."


@dataclass
class SnapKV(Scorer):
    """SnapKV (Li et al. 2024): attention of an observation window, summed, then pooled.

    window_size=32: SnapKV's default; with a question the window is the whole question
    part (at least `window_size` tokens), so every question token votes.
    kernel_size=7, average pooling: neighbours of a hit survive with it, so a number keeps
    its unit and a name its surname; 7 is between SnapKV's 5 and 13 and worked best on our
    sample questions with the small default model.
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "avg"  # "max": a token scores the best of its neighbourhood (the Ada-KV authors' choice)

    def __post_init__(self):
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("window_size must be >= 1 and kernel_size odd and >= 1")
        if self.pooling not in ("avg", "max"):
            raise ValueError("pooling must be 'avg' or 'max'")

    def window(self, layout: PromptLayout) -> int:
        if layout.question_ids:
            return max(len(layout.question_ids), self.window_size) if layout.document_ids else len(layout.question_ids)
        return min(self.window_size, len(layout.document_ids))

    def probes(self, layout: PromptLayout, tokenizer, preceding: list[int] = ()) -> list[Probe]:
        if layout.question_ids:
            return []  # question-aware: the question itself is the window
        return [Probe(layout.question_part(GENERIC_PROBE))]

    def score(self, obs: Observation) -> torch.Tensor:
        scores = obs.attention  # [Hkv, T]
        if self.kernel_size > 1 and scores.shape[-1] > 1:
            pad = self.kernel_size // 2
            if self.pooling == "max":
                scores = F.max_pool1d(scores.unsqueeze(1), self.kernel_size, stride=1, padding=pad).squeeze(1)
            else:
                scores = F.avg_pool1d(scores.unsqueeze(1), self.kernel_size, stride=1, padding=pad, count_include_pad=False).squeeze(1)
        return scores


@dataclass
class KVzip(Scorer):
    """KVzip (Kim et al. 2025): attention received while the model reconstructs the context.

    As the reference (snu-mllab/KVzip) does it: the document is fed back in chunks of
    `chunk_size`, teacher forced, after "Repeat the previous context exactly." for the first
    chunk and "Repeat the part of the previous context exactly, starting with " + the
    previous chunk's last `continuation` tokens for the others. Each probe runs through the
    model over the whole prompt (hidden states as in a real reconstruction), but scores only
    its own chunk: the softmax of its queries runs over [the prefix (attention sinks), the
    chunk, the probe itself], and a token's score is the max over its chunk's probe queries
    and the query heads of its group. No question is involved, so one compressed cache
    serves every later question. chunk_size=2000 and continuation=8: the reference's defaults.
    """

    chunk_size: int = 2000
    continuation: int = 8
    reduce = "max"

    def __post_init__(self):
        if self.chunk_size < 16 or self.continuation < 0:
            raise ValueError("chunk_size must be at least 16 and continuation >= 0")

    def probes(self, layout: PromptLayout, tokenizer, preceding: list[int] = ()) -> list[Probe]:
        doc = layout.document_ids
        out = []
        for start in range(0, len(doc), self.chunk_size):
            # the `continuation` tokens just before this chunk (from `preceding` at the start)
            before = doc[max(0, start - self.continuation) : start]
            if len(before) < self.continuation:
                before = list(preceding)[len(preceding) - (self.continuation - len(before)) :] + before
            if before:
                template = layout.template
                ask = encode(tokenizer, template.middle + "Repeat the part of the previous context exactly, starting with ")
                ask += before + encode(tokenizer, template.suffix)
            else:
                ask = layout.question_part("Repeat the previous context exactly.")
            stop = min(start + self.chunk_size, len(doc))
            out.append(Probe(ask + doc[start:stop], span=(start, stop)))
        return out

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.attention


@dataclass
class Streaming(Scorer):
    """StreamingLLM (Xiao et al. 2023): attention sinks + the most recent tokens."""

    sinks: int = 4
    needs = frozenset()

    def score(self, obs: Observation) -> torch.Tensor:
        recency = torch.arange(obs.length, dtype=torch.float32) / max(obs.length, 1)
        recency[: self.sinks] = 2.0
        return recency.expand(obs.num_kv_heads, -1)


@dataclass
class RandomScorer(Scorer):
    """Uniformly random scores: the floor every real method has to beat."""

    seed: int = 0
    needs = frozenset()

    def score(self, obs: Observation) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1000 + obs.layer_idx)
        return torch.rand(obs.num_kv_heads, obs.length, generator=generator)
