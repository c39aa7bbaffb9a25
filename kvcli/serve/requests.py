"""The API's request bodies: parsed and checked here, at the edge, into typed requests.

kvcli.serve.server turns an HTTP body into an `AskRequest` or a `CompressRequest` with
`parse_json` + `ask_request` / `compress_request`; kvcli.serve.service only ever sees the
typed objects. Every problem is a KvcliError (HTTP 400) naming the field: a wrong type,
a non-finite number (NaN and Infinity are not JSON), a number out of range, too many or
too long questions, JSON nested too deeply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from kvcli.compress.methods import DEFAULT_AGNOSTIC_METHOD, DEFAULT_AWARE_METHOD
from kvcli.api import DEFAULT_MAX_NEW_TOKENS
from kvcli.errors import KvcliError

MAX_QUESTIONS = 32  # per request: each is decoded in turn over the one cache, holding the model
MAX_QUESTION_CHARS = 8192
MAX_NEW_TOKENS = 8192
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_BUDGET = 1 << 24


@dataclass(frozen=True)
class DocumentSource:
    """A document as a request names it: a path the server reads, or the text itself."""

    path: str | None = None
    text: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class AskRequest:
    source: DocumentSource
    questions: tuple[str, ...]
    reuse: bool = True
    method: str = DEFAULT_AWARE_METHOD
    ratio: float | None = None
    budget: int | None = None
    agnostic: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    seed: int | None = None
    stream: bool = True
    cite: bool = False  # each answer record gets "citations" (kvcli.citations)


@dataclass(frozen=True)
class CompressRequest:
    source: DocumentSource
    output: str | None = None  # a .kvc path; None: add the document to the managed caches
    method: str = DEFAULT_AGNOSTIC_METHOD
    ratio: float | None = None
    budget: int | None = None
    kv_dtype: str = "auto"


def _refuse_constant(name: str):
    raise KvcliError(f"malformed JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> dict:
    """A request body: UTF-8 JSON, an object, no NaN/Infinity (deep nesting is a 400, not a crash)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KvcliError(f"malformed JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise KvcliError("a JSON object body is required")
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise KvcliError("malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise KvcliError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise KvcliError("the JSON body must be an object")
    return body


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def field(body: dict, key: str, kind: type, default, *, low=None, high=None):
    """body[key] checked to be of `kind` (null or absent: `default`) and within [low, high]."""
    value = body.get(key)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise KvcliError(f"'{key}' must be {_KINDS[kind]}")
    if kind is float:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            raise KvcliError(f"'{key}' must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise KvcliError(f"'{key}' must be between {low} and {high}")
    return value


def document_source(body: dict) -> DocumentSource:
    path, text = body.get("document"), body.get("text")
    if (path is None) == (text is None):
        raise KvcliError("give exactly one of 'document' (a path) or 'text'")
    if path is not None and (not isinstance(path, str) or not path or "\x00" in path):
        raise KvcliError("'document' must be a file path")
    if text is not None and not isinstance(text, str):
        raise KvcliError("'text' must be a string")
    return DocumentSource(path, text, field(body, "password", str, None))


def _questions(body: dict) -> tuple[str, ...]:
    questions = body.get("questions", [body["question"]] if "question" in body else None)
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise KvcliError("give 'question' (a string) or 'questions' (a list of strings)")
    if len(questions) > MAX_QUESTIONS:
        raise KvcliError(f"too many questions ({len(questions)}; at most {MAX_QUESTIONS} per request)")
    if any(len(q) > MAX_QUESTION_CHARS for q in questions):
        raise KvcliError(f"a question is longer than {MAX_QUESTION_CHARS} characters")
    return tuple(questions)


def _press_fields(body: dict, default_method: str) -> dict:
    return {
        "method": field(body, "method", str, default_method),
        "ratio": field(body, "ratio", float, None, low=0.0, high=1.0),
        "budget": field(body, "budget", int, None, low=1, high=MAX_BUDGET),
    }


def ask_request(body: dict) -> AskRequest:
    return AskRequest(
        source=document_source(body),
        questions=_questions(body),
        reuse=field(body, "reuse", bool, True),
        agnostic=field(body, "agnostic", bool, False),
        max_new_tokens=field(body, "max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS, low=1, high=MAX_NEW_TOKENS),
        temperature=field(body, "temperature", float, 0.0, low=0.0, high=MAX_TEMPERATURE),
        seed=field(body, "seed", int, None, low=0, high=MAX_SEED),
        stream=field(body, "stream", bool, True),
        cite=field(body, "cite", bool, False),
        **_press_fields(body, DEFAULT_AWARE_METHOD),
    )


def compress_request(body: dict) -> CompressRequest:
    output = field(body, "output", str, None)
    if output is not None and (not output.endswith(".kvc") or "\x00" in output):
        raise KvcliError(f"'output' must be a path ending in .kvc (got {output[:200]!r})")
    return CompressRequest(
        source=document_source(body), output=output, kv_dtype=field(body, "kv_dtype", str, "auto"), **_press_fields(body, DEFAULT_AGNOSTIC_METHOD),
    )
