"""How far a compressed cache leaves the model from the full cache, on the same prompt.

Three measures, each against the full (uncompressed) cache of the same prompt:

  answer agreement   the greedy answer is the full cache's answer (whitespace and case aside);
  next-token         the full cache's greedy answer is fed to both caches (teacher forced)
                     and their next-token distributions compared at every step: top-1
                     agreement and KL(full || compressed), the stop token's step included;
  attention output   per layer, ||o_kept - o_full|| / ||o_full|| over the tokens after the
                     cache, where both outputs use the *same* queries (those of the full
                     pass): the error eviction itself adds to one layer, which is what
                     Ada-KV (Feng et al. 2024, Thm. 1) bounds by the evicted attention mass,
                     free of errors carried over from earlier layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcli import api, attention, generate
from kvcli.cache import CompressedCache
from kvcli.generate import CacheAttention
from kvcli.models import LoadedModel


@dataclass
class Reference:
    """The full cache of one prompt and what the model does with it."""

    cache: CompressedCache  # prefix + document, nothing evicted
    with_question: CompressedCache  # the same + the question part (what an aware cache holds)
    question_ids: list[int]
    answer_ids: list[int]  # the greedy answer over the full cache
    stopped: bool  # it ended with a stop token (not cut at the answer budget)
    answer: str
    logits: torch.Tensor  # [steps, vocab] full-cache next-token logits along the answer

    @property
    def steps(self) -> int:
        """Next-token predictions compared: one per answer token, plus the stop if it came."""
        return len(self.answer_ids) + int(self.stopped)

    @property
    def forced(self) -> list[int]:
        """Answer tokens fed after the question to obtain `steps` predictions."""
        return self.answer_ids[: self.steps - 1]


@dataclass
class Fidelity:
    top1: float  # fraction of steps whose most likely token is the full cache's
    kl: float  # mean KL(full || compressed) per step, in nats
    attention_error: list[float] | None  # per layer; None when no token follows the cache


@torch.inference_mode()
def reference(model: LoadedModel, full: api.Compressed, question: str, max_new_tokens: int) -> Reference:
    """Answer `question` greedily over the full, question-agnostic cache `full` (left unchanged)."""
    question_ids = full.layout.question_part(question)
    with_question = full.cache.clone()
    first = generate.forward(model.model, with_question, _ids(question_ids, model))  # [1, vocab]
    answering = with_question.clone()
    (answer_ids,) = generate.decode(model.model, answering, first, max_new_tokens=max_new_tokens, stop_ids=api.stop_ids(model))
    stopped = len(answer_ids) < max_new_tokens
    steps = len(answer_ids) + int(stopped)
    logits = continuation_logits(model, full.cache, question_ids + answer_ids[: steps - 1])[-steps:]
    return Reference(
        cache=full.cache,
        with_question=with_question,
        question_ids=question_ids,
        answer_ids=answer_ids,
        stopped=stopped,
        answer=model.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
        logits=logits,
    )


@torch.inference_mode()
def compare(model: LoadedModel, ref: Reference, compressed: api.Compressed) -> Fidelity:
    """Next-token and attention fidelity of `compressed` (left unchanged) to the full cache."""
    aware = compressed.first_logits is not None
    # An aware cache already holds the question; an agnostic one reads it first.
    fed = ref.forced if aware else ref.question_ids + ref.forced
    logits = continuation_logits(model, compressed.cache, fed) if fed else None
    if aware:
        first = compressed.first_logits.unsqueeze(0)  # [1, vocab]
        logits = first if logits is None else torch.cat([first, logits])
    top1, kl = next_token_agreement(ref.logits, logits[-ref.steps :])
    full = ref.with_question if aware else ref.cache
    errors = attention_errors(model, full, compressed.cache, fed) if fed else None
    return Fidelity(top1=top1, kl=kl, attention_error=errors)


def next_token_agreement(full: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(full || other)) of logits [steps, vocab]."""
    full_logp = torch.log_softmax(full.float(), dim=-1)
    other_logp = torch.log_softmax(other.float(), dim=-1)
    kl = (full_logp.exp() * (full_logp - other_logp)).sum(dim=-1)  # [steps]
    top1 = (full.argmax(dim=-1) == other.argmax(dim=-1)).float()
    return top1.mean().item(), kl.clamp(min=0).mean().item()  # clamp: rounding can go a hair below 0


def continuation_logits(model: LoadedModel, cache: CompressedCache, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] after each of `ids` appended to a copy of `cache`."""
    return generate.forward(model.model, cache.clone(), _ids(ids, model), every_position=True)[0]


class _SideBySide:
    """Attention backend for the full pass that also attends each layer's queries over the
    compressed cache, and accumulates how far that output lies from the full one."""

    def __init__(self, full: CompressedCache, kept: CompressedCache, positions: torch.Tensor):
        self.full = CacheAttention(full, positions)
        self.kept = CacheAttention(kept, positions)
        layers = len(full.layers)
        self.error_sq = [0.0] * layers
        self.norm_sq = [0.0] * layers

    def attend(self, layer_idx, query, key, value, scale):
        exact = self.full.attend(layer_idx, query, key, value, scale)  # [1, Hq, n, D]
        approx = self.kept.attend(layer_idx, query, key, value, scale)
        self.error_sq[layer_idx] += (approx.float() - exact.float()).square().sum().item()
        self.norm_sq[layer_idx] += exact.float().square().sum().item()
        return exact

    def relative_errors(self) -> list[float]:
        return [(e / n) ** 0.5 if n > 0 else 0.0 for e, n in zip(self.error_sq, self.norm_sq)]


@torch.inference_mode()
def attention_errors(model: LoadedModel, full: CompressedCache, kept: CompressedCache, ids: list[int]) -> list[float]:
    """Per layer: relative error of attention outputs over `kept` vs `full` for the same queries."""
    full, kept = full.clone(), kept.clone()
    positions = full.next_position.unsqueeze(1) + torch.arange(len(ids), device=model.device)  # [1, n]
    backend = _SideBySide(full, kept, positions)
    attention.run_layers(model.model, _ids(ids, model), positions, backend)
    return backend.relative_errors()


def _ids(ids: list[int], model: LoadedModel) -> torch.Tensor:
    return torch.tensor([ids], device=model.device)  # [1, n]
