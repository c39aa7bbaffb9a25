"""CriticalKV and DefensiveKV (Feng et al. 2025, the Ada-KV authors' successors).

Both weight attention by how much a token's value can move the layer's output: the L1 norm
of the value after the output projection, ||W_o v||_1, taken per query head and averaged
over the GQA group (`value_weight`). Both first protect the tokens that carry most of the
window's attention, so the weighting only reorders the rest.

CriticalKV (arXiv 2502.03805, as in kvpress): scores = SnapKV's; half the budget of each head
goes to its best tokens by attention alone, the rest by (attention + 1e-4) x ||W_o v||_1.

DefensiveKV (arXiv 2510.13334, FFY0/DefensiveKV): "defensive aggregation": each window
query's attention row is pooled (renormalised to its mass), then a token's score is the MAX
over the window queries and the query heads of its group instead of the mean, floored at
that maximum's mean over the tokens, so no head's score collapses; it is weighted by
||W_o v||_1 normalised over the KV heads of the layer; the tokens that carry `mass` (90%) of
the attention outside the window, less the window's own share, are kept first (CriticalKV's
first stage as the reference runs it). Their budget: one top-k over the heads of a
layer (DefensiveKV) or over all layers (Layer-DefensiveKV); see the method registry.

In progressive reading heads are observed one at a time (different rows per head), so the
weight's normalisation over heads is 1 there and DefensiveKV scores by defensive attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcli.compress.observation import Observation
from kvcli.compress.scorers import SnapKV

# Tokens per block when projecting values through W_o: [G, block, E] fp32 stays small.
VALUE_BLOCK = 2048


def value_weight(obs: Observation) -> torch.Tensor:
    """||W_o v||_1 per KV head and candidate, the mean over the group's query heads: [H, T]."""
    values, o_proj = obs.values.float(), obs.o_proj.float()  # [H, T, D], [H*G, E, D]
    out = values.new_empty(values.shape[0], values.shape[1])
    for h in range(values.shape[0]):
        weights = o_proj[h * obs.group : (h + 1) * obs.group]  # [G, E, D]
        for start in range(0, values.shape[1], VALUE_BLOCK):
            v = values[h, start : start + VALUE_BLOCK]  # [b, D]
            out[h, start : start + v.shape[0]] = torch.matmul(v, weights.transpose(1, 2)).abs().sum(-1).mean(0)
    return out


def force(scores: torch.Tensor, chosen: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """scores [H, T] with the entries of boolean mask `chosen` set to `value` (they are kept first)."""
    return torch.where(chosen, torch.as_tensor(value, dtype=scores.dtype, device=scores.device), scores)


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[H, T] bool: each head's `counts[h]` best entries."""
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < counts.to(scores.device).unsqueeze(-1)


@dataclass
class CriticalKV(SnapKV):
    first_stage: float = 0.5  # share of each head's budget chosen by attention alone
    epsilon: float = 1e-4
    needs = frozenset({"attention", "values", "o_proj"})

    def score(self, obs: Observation) -> torch.Tensor:
        attention = super().score(obs).float()  # [H, T], SnapKV's pooled window attention
        first = int(obs.budget * self.first_stage)
        weighted = (attention + self.epsilon) * value_weight(obs).to(attention.device)
        stage_one = top_mask(attention, torch.full((attention.shape[0],), first))
        return force(weighted, stage_one, weighted.max() + 1)


@dataclass
class DefensiveKV(SnapKV):
    window_size: int = 32
    kernel_size: int = 5  # DefensiveKV's default pooling
    mass: float = 0.9
    needs = frozenset({"attention_rows", "values", "o_proj"})

    def probes(self, layout, tokenizer, preceding=()):
        return []  # the window alone observes, as in the reference (no generic probe)

    def score(self, obs: Observation) -> torch.Tensor:
        rows = obs.attention_rows.float()  # [H, G, W, T]
        heads, group, window, length = rows.shape
        mass = rows.sum(-1, keepdim=True)
        pooled = F.avg_pool1d(rows.reshape(-1, 1, length), self.kernel_size, stride=1, padding=self.kernel_size // 2).reshape(rows.shape)
        pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * mass
        defensive = pooled.amax(dim=(1, 2))  # [H, T]: max over the group and the window
        defensive = torch.maximum(defensive, defensive.mean(-1, keepdim=True))
        weight = value_weight(obs).to(defensive.device)
        scores = defensive * weight / weight.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        # Stage one, as the reference: over the keys outside the window, renormalised, the
        # tokens that carry `mass` minus the window's own share (window_bias, the mean over
        # the layer's heads) are kept first. The reference ranks the prefix (the sinks) among
        # them; here it is kept anyway, so it counts as covered first: of the candidates, the
        # best are forced until the covered share reaches (mass - window_bias) (1 - w) - p,
        # with w the head's window share and p its prefix share = 1 - w - candidates' share.
        mean = rows.mean(dim=(1, 2))  # [H, T], sums to the candidates' share c of the attention
        share = obs.window_share.float().to(mean.device)  # [H]: w
        threshold = self.mass - share.mean()
        ordered = mean.sort(dim=-1, descending=True).values.cumsum(-1)
        needed = mean.sum(-1) - (1 - threshold) * (1 - share)  # = threshold (1 - w) - p
        counts = (ordered < needed.unsqueeze(-1)).sum(-1).clamp(max=int(obs.budget))
        return force(scores, top_mask(mean, counts), scores.max() + 1)
