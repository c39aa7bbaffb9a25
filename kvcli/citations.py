"""Page citations and the page map of what was kept.

An answer cites the pages its tokens attended to. After decoding, one teacher-forced pass
runs the tokens that produced the answer (the last prompt token, then every answer token
but the last) over the compressed cache, in plain torch. Step i of that pass produced
answer token a_i; p(l, q, i, t) is the attention probability its query head q in layer l
pays the kept row of document token t (rows not kept get none). Each document token gets

    copy[t] = sum over l, q, i with token(t) == a_i of p(l, q, i, t) / count of a_i in the document

(attention to where the token being produced stands in the document, rarer tokens weighing
more. Plain attention mass, tried first, is dominated by the document's end, nearest the
question, and by tokens every page has: from an agnostic cache of the sample PDF it cited
the last page for all 16 questions, copy attention the right page for 10 of them and for
all 7 answered correctly; a development run, not kept). A page's score is the sum over its
tokens; when no answer token occurs in the document (or a .kvc file kept no token ids) the
plain mass sum over l, q, i of p(l, q, i, t) stands in. The answer cites the top page, then
in order up to MAX_CITED - 1 more pages scoring at least HALF of it; each citation carries
a snippet, the text around the page's highest-scoring token.

`TokenPages` is the document's page map in token space (which document token lies on
which page) plus the document's token ids for snippets; a fresh read computes it from the
text's character page spans, a .kvc file stores it in its header.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kvcli import attention
from kvcli.cache import CompressedCache, LayerCache
from kvcli.documents import Document

MAX_CITED = 3
HALF = 0.5  # a further page is cited when it draws at least this share of the top page's attention
SNIPPET_BEFORE, SNIPPET_AFTER = 8, 16  # tokens of context around the most attended token
# A .kvc header stores the document's token ids (for snippets) up to this many tokens: about
# 7 MB of JSON, within the header bound (kvcfile.MAX_HEADER_BYTES) with room for the rest.
MAX_STORED_TOKEN_IDS = 1 << 20


@dataclass(frozen=True)
class Citation:
    page: int
    share: float  # the page's share of the attention the answer paid to the document
    snippet: str

    def as_dict(self) -> dict:
        return {"page": self.page, "share": round(self.share, 4), "snippet": self.snippet}


def format_pages(citations: list[Citation]) -> str:
    """"(p. 3, p. 7)": what text output appends to a cited answer."""
    return "(" + ", ".join(f"p. {c.page}" for c in citations) + ")" if citations else "(no page cited)"


class TokenPages:
    """Which page every document token lies on, and the tokens themselves (for snippets).

    Built from a document (lazily: the page spans are computed the first time they are
    needed, so a read that is never cited or saved pays nothing) or from a .kvc header.
    """

    def __init__(self, token_ids: list[int] | None, spans: list[tuple[int, int, int]] | None = None, *, tokenizer=None, document: Document | None = None):
        self.token_ids = token_ids
        self._given = spans
        self._tokenizer, self._document = tokenizer, document

    @classmethod
    def of_document(cls, tokenizer, document: Document, token_ids: list[int]) -> TokenPages:
        return cls(list(token_ids), tokenizer=tokenizer, document=document)

    @cached_property
    def spans(self) -> list[tuple[int, int, int]]:
        """(page, first token, end token) runs over the document's tokens, in order."""
        if self._given is not None:
            return [tuple(s) for s in self._given]
        offsets = _token_char_offsets(self._tokenizer, self._document.text, self.token_ids)
        spans: list[list[int]] = []
        for i, offset in enumerate(offsets):
            page = self._document.page_of(min(offset, len(self._document.text)))
            if spans and spans[-1][0] == page:
                spans[-1][2] = i + 1
            else:
                spans.append([page, i, i + 1])
        return [tuple(s) for s in spans]

    @property
    def num_tokens(self) -> int:
        return self.spans[-1][2] if self.spans else 0

    def page_index(self) -> torch.Tensor:
        """[document tokens] the page of every token."""
        out = torch.empty(self.num_tokens, dtype=torch.int64)
        for page, first, end in self.spans:
            out[first:end] = page
        return out

    def page_tokens(self) -> dict[int, int]:
        """Tokens per page (a page split by another page's tokens counts all its runs)."""
        counts: dict[int, int] = {}
        for page, first, end in self.spans:
            counts[page] = counts.get(page, 0) + end - first
        return counts

    def snippet(self, tokenizer, index: int) -> str:
        if not self.token_ids:
            return ""
        first, end = max(0, index - SNIPPET_BEFORE), min(len(self.token_ids), index + SNIPPET_AFTER)
        text = " ".join(tokenizer.decode(self.token_ids[first:end], skip_special_tokens=True).split())
        return ("…" if first > 0 else "") + text + ("…" if end < len(self.token_ids) else "")

    def header_fields(self) -> dict:
        """What a .kvc header's document section stores of this map."""
        fields: dict = {"token_pages": [list(s) for s in self.spans]}
        if self.token_ids is not None and len(self.token_ids) <= MAX_STORED_TOKEN_IDS:
            fields["token_ids"] = list(self.token_ids)
        return fields


def _token_char_offsets(tokenizer, text: str, token_ids: list[int]) -> list[int]:
    """The offset of each document token's last character: its page is that character's (a
    token's leading space or newline may still belong to the page before).

    A fast tokenizer reports offsets; otherwise the decoded lengths are summed (exact for
    tokenizers whose tokens decode to their own text)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(token_ids):
            return [max(start, end - 1) for start, end in encoded["offset_mapping"]]
    offsets, at = [], 0
    for token in token_ids:
        at += len(tokenizer.decode([token], skip_special_tokens=False))
        offsets.append(max(0, at - 1))
    return offsets


# ---- what was kept --------------------------------------------------------------------


def kept_document_rows(layer: LayerCache, kept: int, head: int, doc_start: int, doc_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over the head's first `kept` rows: which are document rows, their document
    token indices). `kept` is the head's row count as compressed, before any question or
    answer was appended; positions are original ones, progressive reading included."""
    start = int(layer.offsets[head])
    index = layer.positions[0, start : start + kept].long().cpu() - doc_start
    mask = (index >= 0) & (index < doc_tokens)
    return mask, index[mask]


def kept_per_page(cache: CompressedCache, kept: torch.Tensor, pages: TokenPages, doc_start: int) -> dict:
    """Kept share per page: {"pages", "tokens" (per page), "kept_share" (over all layers and
    heads), "per_layer" ([layer][page] share)}; kept: [L, Hkv] rows as compressed."""
    numbers = sorted(pages.page_tokens())
    column = torch.zeros(max(numbers, default=0) + 1, dtype=torch.int64)
    column[torch.tensor(numbers, dtype=torch.int64)] = torch.arange(len(numbers))
    page_column = column[pages.page_index()]  # [document tokens] column of each token's page
    counts = torch.zeros(len(cache.layers), len(numbers))
    for l, layer in enumerate(cache.layers):
        for h in range(layer.num_kv_heads):
            _, rows = kept_document_rows(layer, int(kept[l, h]), h, doc_start, pages.num_tokens)
            counts[l].index_add_(0, page_column[rows], torch.ones(len(rows)))
    tokens = torch.tensor([pages.page_tokens()[p] for p in numbers], dtype=torch.float32).clamp(min=1)
    heads = cache.layers[0].num_kv_heads
    return {
        "pages": numbers,
        "tokens": [pages.page_tokens()[p] for p in numbers],
        "kept_share": [round(x, 4) for x in (counts.sum(0) / (len(cache.layers) * heads * tokens)).tolist()],
        "per_layer": [[round(x, 4) for x in row] for row in (counts / (heads * tokens)).tolist()],
    }


# ---- attention to the document --------------------------------------------------------


@dataclass
class Attention:
    """What the answer's tokens paid each document token ([document tokens] each)."""

    mass: torch.Tensor  # mean attention probability over layers, query heads and steps
    copy: torch.Tensor  # the same, counting only steps whose produced token the row holds, / its count in the document


class _Recorder:
    """Decoding attention (append, then attend over the kept rows; plain torch, what
    cache.attend_reference computes) that also adds up the probability the new tokens pay
    each kept document token: all of it (`mass`), and at each step the part landing on
    rows that hold the token that step produced (`copy`, rarer tokens weighing more)."""

    def __init__(self, cache: CompressedCache, positions: torch.Tensor, kept: torch.Tensor, doc_start: int, pages: TokenPages, produced: list[int]):
        self.cache, self.positions = cache, positions
        doc_tokens = pages.num_tokens
        self.mass = torch.zeros(doc_tokens, dtype=torch.float64)
        self.copy = torch.zeros(doc_tokens, dtype=torch.float64)
        self.weight = 0  # probability rows added up: layers x query heads x new tokens
        self.rows = [
            [kept_document_rows(layer, int(kept[l, h]), h, doc_start, doc_tokens) for h in range(layer.num_kv_heads)]
            for l, layer in enumerate(cache.layers)
        ]
        self.tokens = torch.tensor(pages.token_ids, dtype=torch.int64) if pages.token_ids else None
        if self.tokens is not None:
            produced_t = torch.tensor(produced, dtype=torch.int64)
            counts = (self.tokens.unsqueeze(0) == produced_t.unsqueeze(1)).sum(1).clamp(min=1)  # [steps]
            self.produced, self.rarity = produced_t, 1.0 / counts.double()

    def attend(self, layer_idx, query, key, value, scale):
        layer = self.cache.layers[layer_idx]
        layer.append(key, value, self.positions)
        _, num_q_heads, n, _ = query.shape
        group = num_q_heads // layer.num_kv_heads
        out = torch.empty_like(query)
        for h in range(layer.num_kv_heads):
            keys, values, _ = layer.head_rows(0, h)  # [S, D]
            length = keys.shape[0]
            q = query[0, h * group : (h + 1) * group].float()  # [G, n, D]
            logits = torch.matmul(q, keys.float().T) * scale  # [G, n, S]
            steps = torch.arange(n, device=keys.device)
            visible = torch.arange(length, device=keys.device).unsqueeze(0) <= (length - n + steps).unsqueeze(1)
            probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            out[0, h * group : (h + 1) * group] = torch.matmul(probs, values.float()).to(query.dtype)
            mask, rows = self.rows[layer_idx][h]
            received = probs[:, :, : len(mask)].sum(0).double().cpu()[:, mask]  # [n, document rows]
            self.mass.index_add_(0, rows, received.sum(0))
            if self.tokens is not None:
                holds = (self.tokens[rows].unsqueeze(0) == self.produced.unsqueeze(1)).double()  # [n, rows]
                self.copy.index_add_(0, rows, (received * holds * self.rarity.unsqueeze(1)).sum(0))
        self.weight += num_q_heads * n
        return out


@torch.inference_mode()
def attention_to_document(model, cache: CompressedCache, kept: torch.Tensor, input_ids: list[int], produced: list[int], doc_start: int, pages: TokenPages) -> Attention:
    """The attention `input_ids` (the last prompt token, then the answer but its last token),
    run after `cache` (one sequence), pay each document token; `produced`: the token each
    step produced (the answer). kept: [L, Hkv] rows per head as compressed.

    The pass appends to `cache`: give it a view whose rows past its lengths nobody reads."""
    device = cache.next_position.device
    ids = torch.tensor([input_ids], device=device)
    positions = cache.next_position.unsqueeze(1) + torch.arange(len(input_ids), device=device)
    recorder = _Recorder(cache, positions, kept, doc_start, pages, produced)
    attention.run_layers(model, ids, positions, recorder)
    cache.next_position += len(input_ids)
    weight = max(1, recorder.weight)
    return Attention(recorder.mass / weight, recorder.copy / weight)


def rank(paid: Attention, pages: TokenPages, tokenizer) -> list[Citation]:
    """The cited pages (module doc: scored by copy attention, or by all attention when no
    answer token occurs among the kept ones; the top page, then up to MAX_CITED - 1 more with
    at least HALF its score), each with a snippet around its most attended token."""
    score = paid.copy if float(paid.copy.sum()) > 0 else paid.mass
    total = float(score.sum())
    if total <= 0:
        return []
    page_of = pages.page_index()
    numbers = sorted(pages.page_tokens())
    scores = {page: float(score[page_of == page].sum()) for page in numbers}
    ordered = sorted(numbers, key=lambda page: (-scores[page], page))
    top = scores[ordered[0]]
    cited = [page for page in ordered[:MAX_CITED] if scores[page] >= HALF * top and scores[page] > 0]
    citations = []
    for page in cited:
        on_page = torch.where(page_of == page, score, torch.zeros_like(score))
        citations.append(Citation(page, scores[page] / total, pages.snippet(tokenizer, int(on_page.argmax()))))
    return citations
