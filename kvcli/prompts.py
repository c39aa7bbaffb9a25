"""Prompt layout: the chat template cut into [prefix][document][question part].

Compression treats the three parts differently: the prefix (system prompt, start of the
user turn) is always kept, the document is scored and evicted, and the question part is
the SnapKV observation window when the question is known. A question-agnostic cache
holds prefix + document; any later question part is appended after it, which yields
exactly the token sequence a one-shot `ask` would have used.

The cut is made on the rendered template with sentinels, and each part is tokenized on
its own, so the split is explicit and identical for every question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DOC = "\x00KVCLI-DOCUMENT\x00"
_QUESTION = "\x00KVCLI-QUESTION\x00"

# The user turn around the document and the question. The document sits first so that a
# cache of [prefix][document] can be reused for any question.
USER_TURN = "Read the document below, then answer.\n\n<document>\n" + _DOC + "\n</document>\n\n" + _QUESTION

SUMMARY_INSTRUCTION = "Summarize the document in a few sentences, with its key facts."


@dataclass
class ChatTemplate:
    """The rendered template around the document, split at the sentinels."""

    prefix: str
    middle: str  # between the document and the question
    suffix: str  # after the question: end of user turn + start of the assistant turn

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTemplate":
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": USER_TURN}], tokenize=False, add_generation_prompt=True
            )
        else:  # base models without a template: a plain instruction layout
            text = USER_TURN + "\nAnswer:"
        prefix, rest = text.split(_DOC)
        middle, suffix = rest.split(_QUESTION)
        return cls(prefix=prefix, middle=middle, suffix=suffix)


@dataclass
class PromptLayout:
    """Token ids of the three parts. `question_ids` is empty for a question-agnostic cache."""

    tokenizer: object = field(repr=False)
    template: ChatTemplate = field(repr=False)
    prefix_ids: list[int]
    document_ids: list[int]
    question_ids: list[int]

    @classmethod
    def build(cls, tokenizer, document: str, question: str | None) -> "PromptLayout":
        template = ChatTemplate.from_tokenizer(tokenizer)
        layout = cls(
            tokenizer=tokenizer,
            template=template,
            prefix_ids=encode(tokenizer, template.prefix),
            document_ids=encode(tokenizer, document),
            question_ids=[],
        )
        if question is not None:
            layout.question_ids = layout.question_part(question)
        return layout

    def question_part(self, question: str) -> list[int]:
        """Tokens that follow the document for `question`: closes the user turn, opens the answer."""
        return encode(self.tokenizer, self.template.middle + question.strip() + self.template.suffix)

    @property
    def all_ids(self) -> list[int]:
        return self.prefix_ids + self.document_ids + self.question_ids

    @property
    def document_range(self) -> tuple[int, int]:
        start = len(self.prefix_ids)
        return start, start + len(self.document_ids)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
