"""The evidence-chosen defaults keep finding needles: never fewer than plain SnapKV."""

import random

import pytest

from kvcli import api
from kvcli.benchmarks.needle_depth import QUESTION, as_document, haystack
from kvcli.compress.methods import (
    DEFAULT_AGNOSTIC_METHOD,
    DEFAULT_AWARE_METHOD,
    default_method,
    make_press,
)
from kvcli.eval.tasks import NOISE

DEPTHS = (0.1, 0.5, 0.9)


def found(model, method: str, agnostic: bool) -> int:
    unit = len(model.tokenizer(NOISE * 20, add_special_tokens=False)["input_ids"]) / 20
    hits = 0
    for depth in DEPTHS:
        text, key, number = haystack(depth, int(1800 / unit), random.Random(f"defaults-{depth}"))
        answer, _ = api.ask(model, as_document(text, "haystack"), QUESTION.format(key=key), press=make_press(method, ratio=0.1),
                            agnostic=agnostic, generation=api.Generation(max_new_tokens=32))
        hits += number in answer.answer
    return hits


def test_default_method_follows_the_mode():
    assert default_method(agnostic=False) == DEFAULT_AWARE_METHOD
    assert default_method(agnostic=True) == DEFAULT_AGNOSTIC_METHOD


@pytest.mark.slow
@pytest.mark.parametrize("agnostic", [False, True], ids=["aware", "agnostic"])
def test_default_finds_at_least_as_many_needles_as_snapkv(default_model, agnostic):
    default = found(default_model, default_method(agnostic), agnostic)
    assert default >= found(default_model, "snapkv", agnostic)
    if not agnostic:
        assert default == len(DEPTHS)  # at 10% kept, question-aware, every needle of a 2K haystack
