"""kvcli as Python functions: every CLI command is one of these, and tests call them directly.

    model = load_model()
    doc = load_document("report.pdf")
    result = ask(model, doc, "What was the 2023 revenue?", press=make_press("snapkv", ratio=0.25))
    print(result.answer)

Nothing here prints: progress and streamed text go to callbacks the caller passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from kvcli import citations as page_citations
from kvcli import generate
from kvcli.cache import CompressedCache, LayerCache
from kvcli.compress.methods import Press, make_press
from kvcli.compress.pipeline import DEFAULT_CHUNK
from kvcli.compress.reading import Compressed, Progress, check_fits, context_limit, progressive_notice
from kvcli.compress.reading import read as read_in_weights_dtype
from kvcli.documents import Document
from kvcli.errors import KvcliError
from kvcli.models import LoadedModel
from kvcli.prompts import SUMMARY_INSTRUCTION

__all__ = ["Compressed", "Generation", "Answer", "read", "answer", "ask", "summarize", "report", "context_limit", "check_fits", "progressive_notice"]
TextCallback = Callable[[int, str], None]  # (question index, new text)

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # greedy by default: the same question gives the same answer
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise KvcliError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise KvcliError("--temperature must be >= 0")


@dataclass
class Answer:
    question: str
    answer: str
    tokens: int
    ttft_seconds: float  # from the start of the request to the first answer token
    decode_seconds: float
    citations: list[page_citations.Citation] | None = None  # with cite=True: the pages the answer drew on

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.tokens > 1 and self.decode_seconds > 0 else 0.0


def read(model: LoadedModel, document: Document, press: Press, **options) -> Compressed:
    """Read and compress `document` (kvcli.compress.reading.read: question=, chunk_size=, ...)
    in the model's reading precision, as the CLI and the server do: on a CPU with native
    bf16, bfloat16 autocast around the float32 weights (kvcli.precision). `answer` decodes
    the result in the model's decoding precision."""
    with model.reading() as reader:
        return read_in_weights_dtype(reader, document, press, **options)


def stop_ids(model: LoadedModel) -> set[int]:
    ids = set()
    for source in (model.tokenizer.eos_token_id, getattr(model.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class _TextStream:
    """Incremental detokenization: emit only text that is final (no half UTF-8 characters)."""

    def __init__(self, tokenizer, on_text: TextCallback | None, index: int):
        self.tokenizer, self.on_text, self.index = tokenizer, on_text, index
        self.tokens: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if self.on_text is not None and len(text) > len(self.emitted):
            self.on_text(self.index, text[len(self.emitted) :])
        self.emitted = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.on_text(self.index, text[len(self.emitted) :])
        return text.strip()


def answer(
    model: LoadedModel,
    compressed: Compressed,
    questions: list[str],
    generation: Generation = Generation(),
    *,
    on_text: TextCallback | None = None,
    started: float | None = None,
    cite: bool = False,
) -> list[Answer]:
    """Answer questions over a compressed document; several questions decode as one batch.

    A question-aware cache already holds its question; an agnostic one gets each question
    part appended to its own copy of the cache.

    cite=True: each Answer gets `citations` (kvcli.citations: the pages its tokens attended
    to, best first, each with a snippet), from one more short pass after decoding; the
    document's page map comes with `compressed` (a fresh read, or a .kvc file that holds it).
    """
    started = started if started is not None else time.perf_counter()
    # A cache read in another precision decodes in the model's: cast once, kept rows only.
    compressed = replace(compressed, cache=generate.in_dtype(compressed.cache, model.dtype))
    tokenizer = model.tokenizer
    if compressed.first_logits is not None:
        if len(questions) != 1:
            raise KvcliError("a question-aware cache answers only the question it was built for")
        cache = compressed.cache
        first_logits = compressed.first_logits.unsqueeze(0)
    else:
        question_ids = [compressed.layout.question_part(q) for q in questions]
        longest = max(len(q) for q in question_ids)
        # What the model sees is the cache's positions (compact after a progressive read) + the question.
        used = int(compressed.cache.next_position.reshape(-1)[0])
        limit = compressed.progressive["context"] if compressed.progressive else None
        check_fits(model, used + longest, generation.max_new_tokens, "the document with the question", max_context=limit)
        cache = compressed.cache.repeat(len(questions))
        cache.reserve(longest + generation.max_new_tokens)
        rows = []
        for b, ids in enumerate(question_ids):
            view = cache.sequence(b)
            rows.append(generate.forward(model.model, view, torch.tensor([ids], device=model.device)))
        first_logits = torch.cat(rows)
    if cite and compressed.pages is None:
        raise KvcliError(f"{compressed.source or 'this cache'} has no page map (saved by an older kvcli): compress the document again to cite pages")
    # Where each sequence's prompt ends, for the citation pass after decoding.
    marks = ([layer.lengths.clone() for layer in cache.layers], cache.next_position.clone()) if cite else None
    streams = [_TextStream(tokenizer, on_text, b) for b in range(len(questions))]
    first_token_at: list[float | None] = [None] * len(questions)

    def on_token(b: int, token: int) -> None:
        if first_token_at[b] is None:
            first_token_at[b] = time.perf_counter()
        streams[b].push(token)

    tokens = generate.decode(
        model.model,
        cache,
        first_logits,
        max_new_tokens=generation.max_new_tokens,
        stop_ids=stop_ids(model),
        temperature=generation.temperature,
        seed=generation.seed,
        on_token=on_token,
    )
    finished = time.perf_counter()
    results = []
    for b, question in enumerate(questions):
        first = first_token_at[b] if first_token_at[b] is not None else finished
        results.append(
            Answer(
                question=question,
                answer=streams[b].finish(),
                tokens=len(tokens[b]),
                ttft_seconds=first - started,
                decode_seconds=finished - first,
            )
        )
    if marks is not None:
        for b, result in enumerate(results):
            last_prompt = (compressed.layout.question_ids if compressed.first_logits is not None else question_ids[b])[-1]
            result.citations = _cite(model, compressed, _prompt_view(cache, b, *marks), [last_prompt, *tokens[b][:-1]], tokens[b])
    return results


def _prompt_view(cache: CompressedCache, b: int, lengths: list[torch.Tensor], next_position: torch.Tensor) -> CompressedCache:
    """Sequence b of `cache` as it was before its last prompt token: the citation pass re-runs
    that token and the answer, writing the same rows decoding wrote (nothing reads them after)."""
    layers = [
        LayerCache(layer.keys[b : b + 1], layer.values[b : b + 1], layer.positions[b : b + 1], layer.offsets, lengths[l][b : b + 1] - 1)
        for l, layer in enumerate(cache.layers)
    ]
    return CompressedCache(layers, next_position[b : b + 1] - 1, cache.original_length)


def _cite(model: LoadedModel, compressed: Compressed, view: CompressedCache, input_ids: list[int], produced: list[int]) -> list[page_citations.Citation]:
    """The pages `input_ids` (the tokens that produced the answer `produced`) attended to, run over `view`."""
    doc_start = len(compressed.layout.prefix_ids)
    paid = page_citations.attention_to_document(model.model, view, compressed.kept, input_ids, produced, doc_start, compressed.pages)
    return page_citations.rank(paid, compressed.pages, model.tokenizer)


def ask(
    model: LoadedModel,
    document: Document,
    question: str,
    *,
    press: Press | None = None,
    agnostic: bool = False,
    generation: Generation = Generation(),
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    on_text: TextCallback | None = None,
    max_context: int | None = None,
) -> tuple[Answer, Compressed]:
    """Read `document`, compress it (question-aware unless `agnostic`), answer `question`."""
    press = press or make_press("full")
    started = time.perf_counter()
    compressed = read(
        model,
        document,
        press,
        question=None if agnostic else question,
        chunk_size=chunk_size,
        headroom_tokens=generation.max_new_tokens,
        progress=progress,
        max_context=max_context,
    )
    (result,) = answer(model, compressed, [question], generation, on_text=on_text, started=started)
    return result, compressed


def summarize(model: LoadedModel, document: Document, **kwargs) -> tuple[Answer, Compressed]:
    return ask(model, document, SUMMARY_INSTRUCTION, **kwargs)


def document_info(document: Document) -> dict:
    return {"name": document.name, "sha256": document.sha256, "pages": document.num_pages}


def report(model: LoadedModel, document: dict, compressed: Compressed, answer_: Answer) -> dict:
    """The --json object: answer, model, document (document_info), timings, cache statistics."""
    return {
        "question": answer_.question,
        "answer": answer_.answer,
        "model": {"name": model.name, "fingerprint": model.fingerprint, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                  "decoder": "plain" if model.plain else "transformers"},  # kvcli.plain: follow-ups from .kvc files on a CPU
        "document": {
            "name": document["name"],
            "sha256": document["sha256"],
            "pages": document["pages"] if isinstance(document["pages"], int) else len(document["pages"]),
            "tokens": compressed.document_tokens,
        },
        "timings": {
            "model_load_seconds": round(model.load_seconds, 4),
            "prefill_seconds": round(compressed.prefill.prefill_seconds, 4) if compressed.prefill else 0.0,
            "cache_file": compressed.source,
            "ttft_seconds": round(answer_.ttft_seconds, 4),
            "decode_tokens_per_second": round(answer_.decode_tokens_per_second, 2),
            "new_tokens": answer_.tokens,
        },
        "cache": compressed.stats(),
        **({"kept_per_page": compressed.kept_per_page()} if compressed.pages is not None else {}),
        **({"citations": [c.as_dict() for c in answer_.citations]} if answer_.citations is not None else {}),
    }

