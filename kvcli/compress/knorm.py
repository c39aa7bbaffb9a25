"""Knorm (Devoto et al. 2024): keys with a small norm draw the most attention, so keep those.

No observer queries run: the score reads only the keys (`needs = {"keys"}`), which makes
it the cheapest question-agnostic scorer after random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcli.compress.observation import Observation
from kvcli.compress.scorers import Scorer


@dataclass
class Knorm(Scorer):
    needs = frozenset({"keys"})

    def score(self, obs: Observation) -> torch.Tensor:
        return -obs.keys.float().norm(dim=-1)  # [H, T]
