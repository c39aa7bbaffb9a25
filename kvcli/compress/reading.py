"""Reading a document into a compressed cache: the one entry point both reading paths share.

`read` decides between whole-prompt reading and progressive reading (a prompt longer than
the context), runs it, and returns a `Compressed`: the cache plus what is needed to answer
from it, save it and describe it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from kvcli.cache import CompressedCache
from kvcli.citations import TokenPages, kept_per_page as page_shares
from kvcli.compress.methods import Press, default_method, make_press
from kvcli.compress.pipeline import DEFAULT_CHUNK, PrefillResult, derive, prefill
from kvcli.documents import Document
from kvcli.errors import KvcliError
from kvcli.prompts import PromptLayout

Progress = Callable[[int, int], None]
# The answer length a read leaves room for when the caller does not say (api.DEFAULT_MAX_NEW_TOKENS).
DEFAULT_HEADROOM_TOKENS = 256


@dataclass
class Compressed:
    """A document read and compressed: the cache plus what is needed to reuse it."""

    cache: CompressedCache
    layout: PromptLayout  # document_ids is empty for a cache loaded from a file
    press: Press
    agnostic: bool
    document_tokens: int
    prefill: PrefillResult | None = None  # None when loaded from a file
    first_logits: torch.Tensor | None = None  # question-aware: logits after the question
    source: str | None = None  # the .kvc file it came from
    kept: torch.Tensor | None = None  # [L, Hkv] rows per head as compressed (decoding appends more)
    # Read in chunks (longer than the context): the plan (context, chunk_size, chunks,
    # budget, cap) and compact_length, the positions the cache uses (kvcli.compress.progressive).
    progressive: dict | None = None
    pages: TokenPages | None = None  # the page of every document token (citations, the kept map)

    def __post_init__(self):
        if self.kept is None:
            self.kept = self.cache.kept_per_head()

    @property
    def bytes_per_row(self) -> int:
        keys = self.cache.layers[0].keys
        return keys.shape[-1] * keys.element_size() * 2

    def kept_per_page(self) -> dict | None:
        """{"pages", "tokens", "kept_share"}: the share of each page's document tokens kept,
        over all layers and heads (kvcli.citations.kept_per_page has it per layer too);
        None without a page map."""
        if self.pages is None:
            return None
        shares = page_shares(self.cache, self.kept, self.pages, len(self.layout.prefix_ids))
        return {key: shares[key] for key in ("pages", "tokens", "kept_share")}

    def derive(self, press: Press) -> "Compressed | None":
        """This document at `press`, a heavier budget of the same method, selected from this
        cache by the scores it was compressed with: exactly what reading again would keep
        (kvcli.compress.pipeline.derive), with no model pass. None when that cannot be had
        (no scores: a full cache, a progressive read, an older file; a method whose allocation
        is not nested): then the caller reads again."""
        if not self.agnostic:
            return None
        cache = derive(self.cache, self.press, press, prefix=len(self.layout.prefix_ids), document_tokens=self.document_tokens)
        if cache is None:
            return None
        return Compressed(cache=cache, layout=self.layout, press=press, agnostic=True, document_tokens=self.document_tokens,
                          source=self.source, pages=self.pages)

    def stats(self) -> dict:
        kept = self.kept  # [L, Hkv] incl. prefix/question rows
        other = self.cache.original_length - self.document_tokens
        doc_kept = (kept - other).clamp(min=0)
        per_head = sorted(doc_kept.flatten().tolist())
        full_bytes = self.prefill.full_bytes if self.prefill else None
        return {
            **self.press.describe(),
            "agnostic": self.agnostic,
            "compressed": bool(self.prefill.compressed) if self.prefill else True,
            "document_tokens": self.document_tokens,
            "kept_per_layer": doc_kept.sum(dim=1).tolist(),
            "kept_per_head": {"min": per_head[0], "median": statistics.median(per_head), "max": per_head[-1]},
            "kept_fraction": doc_kept.sum().item() / max(1, doc_kept.numel() * self.document_tokens),
            "full_bytes": full_bytes,
            "compressed_bytes": int(kept.sum()) * self.bytes_per_row,
            "compression_seconds": self.prefill.compression_seconds if self.prefill else 0.0,
            **({"progressive": self.progressive} if self.progressive else {}),
        }


def context_limit(model, max_context: int | None = None) -> int:
    """Positions a prompt may use: the model's context, or less with --max-context (0: unknown)."""
    if max_context is not None and max_context < 1:
        raise KvcliError(f"--max-context must be at least 1 token, got {max_context}")
    limit = model.context_length
    if max_context is not None:
        limit = min(limit, max_context) if limit else max_context
    return limit


def check_fits(model, prompt_tokens: int, max_new_tokens: int, what: str, *, max_context: int | None = None) -> None:
    limit = context_limit(model, max_context)
    if limit and prompt_tokens + max_new_tokens > limit:
        raise KvcliError(
            f"{what} is {prompt_tokens} tokens; with {max_new_tokens} answer tokens that exceeds "
            f"{model.name}'s context window of {limit} tokens (use a shorter document or --max-new-tokens)"
        )


def read(
    model,
    document: Document,
    press: Press,
    *,
    question: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    headroom_tokens: int = DEFAULT_HEADROOM_TOKENS,
    progress: Progress | None = None,
    max_context: int | None = None,
) -> Compressed:
    """Prefill and compress a document: question-aware if `question` is given, else agnostic.

    A prompt that does not fit the context (or `max_context`) with `headroom_tokens` of
    answer is read progressively in chunks (kvcli.compress.progressive); `Compressed.progressive` says so.
    """
    layout = PromptLayout.build(model.tokenizer, document.text, question)
    limit = context_limit(model, max_context)
    if limit and len(layout.all_ids) + headroom_tokens > limit:
        from kvcli.compress.progressive import read_progressive

        defaulted = press.scorer is None  # nothing can be kept whole: the default method, at the most that fits
        fallback = default_method(agnostic=question is None)
        if defaulted:
            press = make_press(fallback, budget=limit)
        result = read_progressive(
            model.model, layout, press, context=limit, chunk_size=chunk_size, answer_tokens=headroom_tokens,
            headroom=headroom_tokens + 64, progress=progress,
        )
        if defaulted:  # say what was actually kept, not the cap asked for
            press = make_press(fallback, budget=max(1, int(result.plan.budget)))
        progressive = {**result.plan.describe(), "compact_length": result.compact_length}
    else:
        result = prefill(model.model, layout, press, chunk_size=chunk_size, headroom=headroom_tokens + 64, progress=progress)
        progressive = None
    return Compressed(
        cache=result.cache,
        layout=layout,
        press=press,
        agnostic=question is None,
        document_tokens=len(layout.document_ids),
        prefill=result,
        first_logits=result.last_logits if question is not None else None,
        progressive=progressive,
        pages=TokenPages.of_document(model.tokenizer, document, layout.document_ids),
    )


def progressive_notice(compressed: Compressed) -> str | None:
    """The one line the CLI prints when a document was read in chunks (None otherwise)."""
    plan = compressed.progressive
    if not plan:
        return None
    prompt = compressed.cache.original_length
    return (
        f"document is {compressed.document_tokens} tokens ({prompt} with the prompt), more than the model's context of "
        f"{plan['context']}: read it in {plan['chunks']} chunks of {plan['chunk_size']} with {compressed.press.name} "
        f"at budget {plan['budget']:g} tokens per head"
    )


