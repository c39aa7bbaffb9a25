"""kvcli as Python functions: every CLI command is one of these, and tests call them directly.

    model = load_model()
    doc = load_document("report.pdf")
    result = ask(model, doc, "What was the 2023 revenue?", press=make_press("snapkv", ratio=0.25))
    print(result.answer)

Nothing here prints: progress and streamed text go to callbacks the caller passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from kvcli import generate
from kvcli.compress.methods import Press, make_press
from kvcli.compress.pipeline import DEFAULT_CHUNK
from kvcli.compress.reading import Compressed, Progress, check_fits, context_limit, progressive_notice, read
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

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.tokens > 1 and self.decode_seconds > 0 else 0.0


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
) -> list[Answer]:
    """Answer questions over a compressed document; several questions decode as one batch.

    A question-aware cache already holds its question; an agnostic one gets each question
    part appended to its own copy of the cache.
    """
    started = started if started is not None else time.perf_counter()
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
    return results


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
        "model": {"name": model.name, "fingerprint": model.fingerprint, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")},
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
    }
