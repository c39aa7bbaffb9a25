"""quality(c, x) of the cache manager: how far a compressed cache's answers drift from the full one's.

The fidelity metric EVICPRESS profiles per document: agreement with the full cache on
probe questions, measured with the model itself (kvcli.serve.service profiles every document
when it is added and again when idle; kvcli.benchmarks.evicpress --real uses it too).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kvcli import api, generate
from kvcli.compress.reading import Compressed
from kvcli.cache import CompressedCache, LayerCache
from kvcli.store.kvcfile import GROUP_SIZE
from kvcli.documents import Document
from kvcli.eval.fidelity import continuation_logits
from kvcli.serve.manager import Config, Entry
from kvcli.compress.methods import make_press
from kvcli.models import LoadedModel
from kvcli.store.quantize import dequantize, quantize

PROBE_QUESTIONS = ("What is this document about?", "List the key facts the document states.")
# Where in the document the passage probes quote from (fractions of its words): a generic
# question is answered from what any cache keeps; a question about a passage deep inside is
# answered only if that passage survived, as a user's question about one fact is.
PASSAGE_DEPTHS = (0.0, 0.35, 0.7)
PASSAGE_WORDS = 6


def passage_probes(text: str, depths: Sequence[float] = PASSAGE_DEPTHS) -> list[str]:
    """One question per depth about the `PASSAGE_WORDS` words found there (distinct ones only)."""
    words = text.split()
    starts = sorted({min(int(d * len(words)), max(0, len(words) - PASSAGE_WORDS)) for d in depths})
    return [f"What does the document say about {' '.join(words[s : s + PASSAGE_WORDS])}?" for s in starts if words]


def press_for(config: Config):
    return make_press(config.method, ratio=None if config.method == "full" else config.ratio)


def from_reads(reads: dict[tuple[str, float], Compressed], config: Config) -> Compressed | None:
    """config's cache among `reads` ({(method, ratio): Compressed}), or selected from the
    closest lighter read of its method by the scores it was compressed with
    (`Compressed.derive`: no model pass); None when neither gives it."""
    found = reads.get((config.method, config.ratio))
    if found is not None:
        return found
    target = press_for(config)
    lighter = sorted(((r, c) for (m, r), c in reads.items() if m == config.method and r > config.ratio), key=lambda rc: rc[0])
    return next((c for c in (held.derive(target) for _, held in lighter) if c is not None), None)


def quantized_copy(compressed: Compressed, kv_dtype: str) -> Compressed:
    """What a cache stored as int8/int4 reads back as (compute dtype, rounding applied)."""
    bits = {"int8": 8, "int4": 4}.get(kv_dtype)
    if bits is None:
        return compressed
    layers = []
    for layer in compressed.cache.layers:
        parts = {}
        for name in ("keys", "values"):
            rows = getattr(layer, name)  # [1, C, D]
            codes = quantize(rows.float(), bits, GROUP_SIZE)
            parts[name] = dequantize(
                codes[0], codes[1], codes[2] if bits == 4 else None, bits=bits, group_size=GROUP_SIZE,
                dim=rows.shape[-1], dtype=rows.dtype,
            )
        layers.append(LayerCache(parts["keys"], parts["values"], layer.positions.clone(), layer.offsets.clone(), layer.lengths.clone()))
    cache = CompressedCache(layers, compressed.cache.next_position.clone(), compressed.cache.original_length)
    return Compressed(
        cache=cache, layout=compressed.layout, press=compressed.press, agnostic=True,
        document_tokens=compressed.document_tokens, kept=compressed.kept, progressive=compressed.progressive,
    )


class AgreementProfiler:
    """quality(c, x): top-1 agreement with the full cache, teacher-forced over its answers.

    For each probe question the full cache answers greedily (`answer_tokens` tokens); every
    configuration then reads the same question and answer in one forward pass, and quality
    is the fraction of positions where its greedy next token equals the full cache's. (The
    common prefix of the two greedy answers instead, the serve benchmark's score of users'
    answers, misjudged users' quality several times as much on its needle documents: free-
    form probe answers part at their first words; kvcli.benchmarks.profile_calibration.) One
    read per distinct (method, ratio), and heavier ratios of a method whose allocation is
    nested (KVzip) are selected from its lightest read instead (`Compressed.derive`: the
    same cache, no model pass); int8/int4 are applied to that read's cache. Probes:
    generic questions, questions about passages at several depths (`passage_probes`), and
    the questions users recently asked about it (so a re-profile when idle follows real use).
    """

    def __init__(
        self,
        model: LoadedModel,
        configs: Sequence[Config],
        *,
        documents: Callable[[str], Document | None] = lambda entry_id: None,
        recent_questions: Callable[[str], list[str]] = lambda entry_id: [],
        answer_tokens: int = 12,
        probes: tuple[str, ...] = PROBE_QUESTIONS,
    ):
        """`configs`: the manager's configurations (indices refer to them); `documents` and
        `recent_questions`: an entry id's document (None if its text is unknown) and the
        questions users recently asked about it (the server passes its own lookups)."""
        self.model, self.configs = model, configs
        self.documents, self.recent_questions = documents, recent_questions
        self.answer_tokens, self.probes = answer_tokens, probes
        # The reads of the last document profiled, {(method, ratio): Compressed}, until the
        # server takes them (`take_reads`): its next placement move is then no read.
        self._last_reads: tuple[str, dict] | None = None

    def take_reads(self, entry_id: str) -> dict[tuple[str, float], Compressed]:
        """The caches read while profiling `entry_id` last (once: they are let go), {} if none."""
        last, self._last_reads = self._last_reads, None
        return last[1] if last is not None and last[0] == entry_id else {}

    def probe_questions(self, document: Document) -> list[str]:
        """The probes every document gets: generic questions and its passages at several depths."""
        return [*self.probes, *passage_probes(document.text)]

    def questions(self, entry: Entry, document: Document) -> list[str]:
        return [*self.probe_questions(document), *self.recent_questions(entry.id)]

    def __call__(self, entry: Entry, configs: list[int]) -> dict[int, float]:
        document = self.documents(entry.id)
        if document is None or not document.text:
            return {}
        reads: dict[tuple[str, float], Compressed] = {}
        scores = self.per_question(document, self.questions(entry, document), configs, reads=reads)
        self._last_reads = (entry.id, reads)
        return {index: sum(s) / len(s) if s else 1.0 for index, s in scores.items()}

    def per_question(self, document: Document, questions: list[str], configs: list[int],
                     reads: dict[tuple[str, float], Compressed] | None = None) -> dict[int, list[float]]:
        """Each configuration's agreement with the full cache, one score per question it answered.
        reads: filled with the caches read (or derived) for it, by (method, ratio)."""
        model = self.model
        reads = self.read_configs(document, configs, {} if reads is None else reads)
        full = reads[("full", 1.0)]
        references = []
        for question in questions:
            ids = full.layout.question_part(question)
            answer = greedy_answer(model, full, ids, self.answer_tokens)
            if answer:
                references.append((ids, answer))
        scores = {}
        for index in configs:
            config = self.configs[index]
            compressed = quantized_copy(reads[(config.method, config.ratio)], config.kv_dtype)
            scores[index] = [self._agreement(compressed, ids, answer) for ids, answer in references]
        return scores

    def read_configs(self, document: Document, configs: list[int], reads: dict[tuple[str, float], Compressed]) -> dict:
        """`reads` filled with the full cache and each configuration's (method, ratio) cache:
        lightest first, so heavier ratios of a nested method are selected from it, not read."""
        for config in [Config("full", 1.0), *sorted((self.configs[i] for i in configs), key=lambda c: -c.ratio)]:
            key = (config.method, config.ratio)
            if key not in reads:
                reads[key] = from_reads(reads, config) or api.read(
                    self.model, document, press_for(config), question=None, headroom_tokens=self.answer_tokens + 64
                )
        return reads

    def predicted(self, compressed: Compressed, question_ids: list[int], answer: list[int]) -> list[int]:
        """compressed's greedy next token at each position of `answer`, teacher-forced (one pass)."""
        ids = question_ids + answer[:-1]  # the answer's last token is predicted, never read
        logits = continuation_logits(self.model, compressed.cache, ids)  # [n, V]
        return logits[len(question_ids) - 1 :].argmax(-1).tolist()  # [len(answer)]

    def _agreement(self, compressed: Compressed, question_ids: list[int], answer: list[int]) -> float:
        predicted = self.predicted(compressed, question_ids, answer)
        return sum(p == t for p, t in zip(predicted, answer)) / len(answer)


def greedy_answer(model: LoadedModel, compressed: Compressed, question_ids: list[int], max_new_tokens: int) -> list[int]:
    """The greedy answer (token ids, at most `max_new_tokens`) over a copy of compressed's cache."""
    cache = compressed.cache.clone()
    first = generate.forward(model.model, cache, torch.tensor([question_ids], device=model.device))
    (answer,) = generate.decode(model.model, cache, first, max_new_tokens=max_new_tokens, stop_ids=api.stop_ids(model), cuda_graph=False)
    return answer
