"""Methods: named presets of (scorer, budget policy), and how much they keep.

One registry drives the CLI's choices, the eval sweeps and the contract test that runs
every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvcli.compress.budgets import CrossLayerPolicy, Policy
from kvcli.errors import KvcliError
from kvcli.compress.scorers import KVzip, RandomScorer, Scorer, SnapKV, Streaming


@dataclass
class Press:
    """A compression method with its budget: `ratio` of the document, or `budget` tokens per head."""

    name: str
    scorer: Scorer | None  # None: keep everything (the full cache)
    policy: Policy | CrossLayerPolicy | None
    ratio: float | None = None
    budget: int | None = None

    def budget_for(self, doc_length: int) -> float | None:
        """Mean document tokens kept per KV head, or None when nothing is evicted."""
        if self.scorer is None:
            return None
        budget = self.budget if self.budget is not None else (self.ratio if self.ratio is not None else 1.0) * doc_length
        if budget >= doc_length:
            return None  # the document already fits in the budget: keep it whole
        return max(1.0, budget)

    def describe(self) -> dict:
        return {"method": self.name, "ratio": self.ratio, "budget": self.budget}


PRESETS: dict[str, Callable[[], tuple[Scorer | None, Policy | CrossLayerPolicy | None]]] = {
    "full": lambda: (None, None),
    "snapkv": lambda: (SnapKV(), Policy("uniform", "uniform")),
    "pyramid": lambda: (SnapKV(), Policy("pyramid", "uniform")),
    "ada-snapkv": lambda: (SnapKV(), Policy("uniform", "ada")),
    "ada-pyramid": lambda: (SnapKV(), Policy("pyramid", "ada")),
    "dynamic": lambda: (SnapKV(), CrossLayerPolicy("dynamic")),
    "kvzip": lambda: (KVzip(), CrossLayerPolicy("global", max_factor=3.0)),
    "streaming": lambda: (Streaming(), Policy("uniform", "uniform")),
    "random": lambda: (RandomScorer(), Policy("uniform", "uniform")),
}
METHODS = list(PRESETS)
DEFAULT_METHOD = "ada-snapkv"
DEFAULT_RATIO = 0.25


def make_press(method: str, *, ratio: float | None = None, budget: int | None = None, alpha: float | None = None) -> Press:
    if method not in PRESETS:
        raise KvcliError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if ratio is not None and budget is not None:
        raise KvcliError("give --ratio or --budget, not both")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise KvcliError(f"--ratio must be in (0, 1], got {ratio}")
    if budget is not None and budget < 1:
        raise KvcliError(f"--budget must be at least 1 token per head, got {budget}")
    scorer, policy = PRESETS[method]()
    if alpha is not None:
        if not isinstance(policy, Policy) or policy.heads != "ada":
            raise KvcliError("--alpha applies to the Ada-KV methods (ada-snapkv, ada-pyramid)")
        if not 0.0 <= alpha <= 1.0:
            raise KvcliError(f"--alpha must be in [0, 1], got {alpha}")
        policy.alpha = alpha
    if ratio is None and budget is None and scorer is not None:
        ratio = DEFAULT_RATIO
    return Press(name=method, scorer=scorer, policy=policy, ratio=ratio, budget=budget)
