"""Budget policies: given scores, how many tokens each layer and each KV head keeps.

`budget` is the mean number of document tokens kept per KV head (ratio x document
length). Two independent choices make a policy:

  layer schedule   uniform: every layer gets `budget`
                   pyramid: PyramidKV (Cai et al. 2024), linearly decreasing from the
                            bottom layer to the top, same mean
  head allocation  uniform: every head keeps the layer budget (its own top-k)
                   ada:     Ada-KV (Feng et al. 2024), one top-k over all heads of the
                            layer, after a safeguard floor of alpha x budget per head
                            (what kvpress and most re-implementations do)
                   ada-shares: Ada-KV as its authors' code allocates: each head's share
                            of a full-budget top-k, shrunk by (1 - alpha), plus the floor

and two cross-layer policies that revisit layers already compressed, since the prefill
compresses one layer at a time:

  dynamic: DynamicKV (Zhou et al. 2024): each layer first keeps up to
           `max_factor` x budget per head; every `interval` layers the budget of all
           layers seen so far is re-allocated by a top-k over their scores, and layers
           are trimmed to their share (uniform over the heads of a layer).
  global:  KVzip's default: one threshold over all layers and heads, applied at the
           end to candidates capped at `max_factor` x budget per head per layer (the cap
           bounds memory during prefill; with max_factor >= 1/ratio it is exact).
           max_factor=None: no cap, the exact top-k (Layer-DefensiveKV's reference); every
           layer then holds its whole document until the last layer re-allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def layer_budgets(schedule: str, budget: float, num_layers: int, doc_length: int, beta: float = 20.0) -> list[int]:
    """Tokens per head for each layer; their mean is `budget` (before clamping to the document)."""
    if schedule == "uniform" or num_layers == 1:
        raw = [budget] * num_layers
    elif schedule == "pyramid":
        # PyramidKV: top layer gets budget/beta, bottom 2*budget - that, linear in between.
        low = budget / beta
        high = 2 * budget - low
        raw = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    else:
        raise ValueError(f"unknown layer schedule {schedule!r}")
    return [max(1, min(doc_length, round(b))) for b in raw]


def _sorted(indices: torch.Tensor) -> torch.Tensor:
    return torch.sort(indices).values


def select_uniform(scores: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Each head keeps its own top-`count`. scores [Hkv, T] -> sorted indices per head."""
    count = min(count, scores.shape[-1])
    top = scores.topk(count, dim=-1).indices  # [Hkv, count]
    return [_sorted(row) for row in top]


def select_ada(scores: torch.Tensor, count: int, alpha: float) -> list[torch.Tensor]:
    """Ada-KV: a floor of alpha*count per head, the rest by one top-k across the heads.

    The layer keeps Hkv*count tokens in total, as uniform would; heads whose attention is
    concentrated give budget to heads whose attention is spread out.
    """
    num_heads, length = scores.shape
    count = min(count, length)
    floor = min(count, int(alpha * count))
    order = scores.argsort(dim=-1, descending=True)  # [Hkv, T]
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(1, order[:, :floor], True)
    remaining = num_heads * count - num_heads * floor
    if remaining > 0:
        flat = scores.masked_fill(chosen, float("-inf")).flatten()
        extra = flat.topk(remaining).indices
        chosen.view(-1)[extra] = True
    return [torch.nonzero(row).flatten() for row in chosen]


def select_ada_shares(scores: torch.Tensor, count: int, alpha: float) -> list[torch.Tensor]:
    """Ada-KV as its authors' code allocates (FFY0/AdaKV, AdaptiveSnapKVCluster).

    Each head's share c_h is how many of the layer's top Hkv*count scores are its own (one
    top-k at the full budget, no floor); the head then keeps its own top
    round(c_h * (1 - alpha) + floor(alpha * count)): every head's share shrinks in
    proportion, and the freed budget becomes the same floor for all.
    """
    num_heads, length = scores.shape
    count = min(count, length)
    winners = scores.flatten().topk(num_heads * count).indices // length
    shares = torch.bincount(winners, minlength=num_heads).to(torch.float64)
    keep = torch.round(shares * (1 - alpha) + int(alpha * count)).long().clamp(max=length)
    order = scores.argsort(dim=-1, descending=True)
    return [torch.sort(order[h, : int(keep[h])]).values for h in range(num_heads)]


@dataclass
class Policy:
    """A layer schedule x a head allocation (see the module docstring)."""

    schedule: str = "uniform"
    heads: str = "uniform"
    alpha: float = 0.2  # Ada-KV's safeguard: every head keeps at least 20% of the mean budget
    cross_layer = False

    def __post_init__(self):
        if self.schedule not in ("uniform", "pyramid"):
            raise ValueError(f"unknown layer schedule {self.schedule!r}")
        if self.heads not in ("uniform", "ada", "ada-shares"):
            raise ValueError(f"unknown head allocation {self.heads!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be within [0, 1]")

    def select(self, layer_idx: int, num_layers: int, scores: torch.Tensor, budget: float) -> list[torch.Tensor]:
        count = layer_budgets(self.schedule, budget, num_layers, scores.shape[-1])[layer_idx]
        if self.heads == "ada":
            return select_ada(scores, count, self.alpha)
        if self.heads == "ada-shares":
            return select_ada_shares(scores, count, self.alpha)
        return select_uniform(scores, count)


@dataclass
class CrossLayerPolicy:
    """DynamicKV (`mode="dynamic"`) or one global threshold (`mode="global"`)."""

    mode: str = "dynamic"
    max_factor: float | None = 2.0  # DynamicKV keeps up to 2x the mean per layer before re-allocating; None: no cap
    interval: int = 4  # re-allocate every 4 layers (DynamicKV's progressive update)
    cross_layer = True

    def __post_init__(self):
        if self.mode not in ("dynamic", "global"):
            raise ValueError(f"unknown cross-layer mode {self.mode!r}")
        if (self.max_factor is not None and self.max_factor < 1.0) or self.interval < 1:
            raise ValueError("max_factor must be >= 1 (or None) and interval >= 1")

    def cap(self, budget: float, doc_length: int) -> int:
        if self.max_factor is None:
            return max(1, doc_length)
        return max(1, min(doc_length, round(self.max_factor * budget)))

    def select(self, layer_idx: int, num_layers: int, scores: torch.Tensor, budget: float) -> list[torch.Tensor]:
        """Candidates at layer time: each head's top `cap`."""
        return select_uniform(scores, self.cap(budget, scores.shape[-1]))

    def due(self, layer_idx: int, num_layers: int) -> bool:
        last = layer_idx == num_layers - 1
        return last or (self.mode == "dynamic" and (layer_idx + 1) % self.interval == 0)

    def reallocate(self, candidate_scores: list[list[torch.Tensor]], budget: float) -> list[list[torch.Tensor]]:
        """Trim the layers seen so far to `budget` x heads x layers in total.

        candidate_scores[l][h]: scores of layer l head h's current candidates (in row
        order). Returns, per layer and head, which candidate positions survive.
        """
        num_heads = len(candidate_scores[0])
        total = round(budget * num_heads * len(candidate_scores))
        flat = torch.cat([s for layer in candidate_scores for s in layer])
        total = min(total, flat.numel())
        if self.mode == "global":
            threshold_index = flat.topk(total).indices
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            keep[threshold_index] = True
            out, start = [], 0
            for layer in candidate_scores:
                heads = []
                for s in layer:
                    heads.append(torch.nonzero(keep[start : start + s.numel()]).flatten())
                    start += s.numel()
                out.append(heads)
            return out
        # dynamic: layer shares from a top-k over all candidates, then uniform per head
        owner = torch.cat(
            [torch.full((s.numel(),), l) for l, layer in enumerate(candidate_scores) for s in layer]
        )
        winners = owner[flat.topk(total).indices]
        shares = torch.bincount(winners, minlength=len(candidate_scores)).tolist()
        out = []
        for layer, share in zip(candidate_scores, shares):
            per_head = max(1, share // num_heads)
            out.append([_sorted(s.topk(min(per_head, s.numel())).indices) for s in layer])
        return out
