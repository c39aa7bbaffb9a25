"""What a scorer sees of one layer: the contract between the reading pipeline and scorers.

A scorer declares `needs`, a set of the names below; the pipeline (kvcli.compress.pipeline)
computes only those, once per layer, over the layer's *candidate* rows (the document
tokens it may evict), and leaves every other field None. Shapes, with H the KV heads in
this observation, G the query heads per KV head, T the candidates, W the window, D head_dim:

    attention   [H, T]        softmax attention the observers (the prompt's trailing window,
                              then any probe sequences) paid to each candidate, reduced over
                              observer queries and the G query heads by `scorer.reduce`
                              ("sum": sum over queries, mean over the group; "max": max of both)
    attention_rows [H, G, W, T] the window's attention probabilities, unreduced: per query head
                              and window query (softmax over every row the query sees)
    window_share [H]          (with attention_rows) the share of that attention the window
                              paid to its own rows, the mean over its queries and the group
    keys        [H, T, D]     the candidates' keys, rotated as stored
    values      [H, T, D]
    queries     [H*G, W, D]   the window's queries (rotated), e.g. for query statistics
    o_proj      [H*G, E, D]   the layer's output projection, per query head (E: hidden size):
                              o_proj[j] @ v is what query head j adds to the residual for value v
    positions   [T]           original prompt positions of the candidates
Every observation also carries `budget`, the mean number of rows per head that will be kept.

During progressive reading heads keep different rows, so the pipeline observes one KV head
at a time (H = 1, with its G query heads); whole-prompt reading observes all heads at once.
A scorer written against these shapes works in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEEDS = frozenset({"attention", "attention_rows", "keys", "values", "queries", "o_proj", "positions"})


@dataclass
class Observation:
    layer_idx: int
    num_layers: int
    num_kv_heads: int  # H: KV heads in this observation (1 when heads are observed one at a time)
    group: int  # G: query heads per KV head
    length: int  # T: candidate rows
    budget: float  # mean candidate rows per head the budget policy will keep (always given)
    attention: torch.Tensor | None = None
    attention_rows: torch.Tensor | None = None
    window_share: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    o_proj: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def check_needs(needs: frozenset[str] | set[str], owner: str) -> None:
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"{owner} needs {sorted(unknown)}, which no observation provides (known: {sorted(NEEDS)})")
