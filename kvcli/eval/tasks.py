"""Long-context tasks generated locally, any length, and their scoring: RULER's, offline.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") builds synthetic tasks whose answers are planted in a haystack, so a
task can be made at any length and its answer is known. Kept here:

    niah_single      one needle (a key and a 7-digit number) in the haystack
    niah_multikey    four needles with different keys; one key is asked for
    niah_multivalue  one key with four numbers; all four are asked for
    niah_multiquery  four keys; the numbers of all four are asked for
    vt               variable tracking: a chain VAR A = 12345, VAR B = VAR A, ...
    cwe              common-word extraction: the 10 most frequent words of a long list
    qa               a question over the sample documents (samples/questions.jsonl),
                     cut or padded with the other samples to the length

The haystack is RULER's "noise" one (a few repeated sentences), since the essays it
otherwise uses would have to be downloaded. The question carries the task's instruction
and comes after the document, so a question-aware cache sees it and an agnostic one not.

Length is RULER's: the whole prompt (template + document + question) plus the answer
budget fits in `length` tokens; each generator grows its filler until one more unit
would not fit. Everything random is drawn from a `random.Random` seeded by (task, seed,
index) before fitting, so a sample is the same at every length, only its filler grows.

Scoring is RULER's string match: `all` (the fraction of the expected strings found in the
answer) for the synthetic tasks, `part` (1 if any one is found) for QA.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from kvcli.errors import KvcliError

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

# RULER's noise haystack, one unit.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# Plain English nouns: needle keys are pairs of them, cwe draws its list from them.
WORDS = """
anchor apple arrow badge barrel basket beacon bell blanket bottle bridge bucket button cabin
camera candle canyon carpet castle cellar chair chimney circle cliff clock cloud coast compass
copper cottage crystal curtain desert diamond dinner dragon drum eagle engine falcon feather
fence ferry field forest fountain garden garlic glacier glove granite harbor harvest helmet
hammer island jacket jungle kettle kitchen ladder lantern lemon letter library lighthouse
lizard magnet maple market meadow mirror monkey mountain needle oyster paddle palace
panther parrot pencil pepper piano pillow pirate planet pocket pumpkin puzzle rabbit radio
ribbon river rocket saddle sailor salmon scarf shadow shelter silver sketch sparrow spider
spoon statue stone summer sunset table teapot temple thunder ticket tiger timber tomato
tower tractor trumpet tunnel turtle umbrella valley velvet village violin wagon walnut
window winter wizard wolf yacht zebra acorn album autumn bamboo banjo beetle biscuit blossom
boulder breeze brick cactus canoe carrot cedar cherry cobalt coral cricket dolphin donkey
ember fiddle flute goblet gravel hazel hornet igloo ivory jasmine juniper kayak koala
lagoon linen lobster marble melon mitten moss nutmeg orchid otter pebble pelican penguin
quartz quill raven reef saffron sapphire satchel seashell sequoia spruce squirrel thimble
thistle tulip walrus willow
""".split()

TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "qa"]

# Answer budgets, RULER's per task (128 for needles) cut down to what the answers need:
# a 7-digit number is 7 tokens (SmolLM2 writes digits one by one), and the CPU pays
# for every budgeted token it decodes.
MAX_NEW_TOKENS = {
    "niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
    "vt": 48, "cwe": 64, "qa": 32,
}

PromptTokens = Callable[[str, str], int]  # (document, question) -> tokens of the whole prompt


@dataclass(frozen=True)
class Sample:
    task: str
    context: str  # the document: what the model reads and the cache compresses
    question: str  # asked after the document: the task's instruction and query
    answers: tuple[str, ...]
    metric: str  # "all": every answer must appear; "part": one is enough
    max_new_tokens: int


def score(sample: Sample, prediction: str) -> float:
    """RULER's string match: case-insensitive containment of the expected strings."""
    return match_all(prediction, sample.answers) if sample.metric == "all" else match_part(prediction, sample.answers)


def match_all(prediction: str, answers: tuple[str, ...]) -> float:
    found = [answer.lower() in prediction.lower() for answer in answers]
    return sum(found) / len(found)


def match_part(prediction: str, answers: tuple[str, ...]) -> float:
    return float(any(answer.lower() in prediction.lower() for answer in answers))


def generate(
    task: str, *, length: int, seed: int, index: int, prompt_tokens: PromptTokens, max_new_tokens: int | None = None
) -> Sample:
    """Sample `index` of `task` for `seed`, filled so that prompt + answer budget <= length tokens."""
    if task not in GENERATORS:
        raise KvcliError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
    answer_tokens = max_new_tokens or MAX_NEW_TOKENS[task]
    rng = random.Random(f"{task}:{seed}:{index}")  # str seeds hash with SHA-512: stable across runs
    question, answers, metric, build = GENERATORS[task](rng, seed, index)
    budget = length - answer_tokens

    def fits(n: int) -> bool:
        return prompt_tokens(build(n), question) <= budget

    context = build(_largest(fits, task, length))
    return Sample(task, context, question, tuple(answers), metric, answer_tokens)


def _largest(fits: Callable[[int], bool], task: str, length: int) -> int:
    """The largest n >= 1 with fits(n), for fits true up to some n and false after."""
    if not fits(1):
        raise KvcliError(f"length {length} is too short for task {task}: its question and answer alone do not fit")
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _insert(units: list[str], inserts: list[tuple[float, str]]) -> str:
    """Place each (depth in [0, 1], text) between the filler units; equal depths keep their order."""
    out = list(units)
    # Deepest first, so earlier insertions do not shift the places of later ones.
    for depth, text in reversed(sorted(inserts, key=lambda item: item[0])):
        out.insert(round(depth * len(units)), text)
    return "".join(out)


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(WORDS, 2))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}. "


def _niah(rng: random.Random, keys: int, values: int, queried: int):
    """Needles for `keys` keys with `values` numbers each; the first `queried` keys are asked for."""
    names = list(dict.fromkeys(_key(rng) for _ in range(keys * 4)))[:keys]  # distinct keys
    needles = [(name, _number(rng)) for name in names for _ in range(values)]
    depths = [rng.random() for _ in needles]
    asked = names[:queried]
    answers = [value for name, value in needles if name in asked]
    listed = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    many = len(answers) > 1
    question = (
        f"Some special magic numbers are hidden in the document. What {'are all the special magic numbers' if many else 'is the special magic number'} "
        f"for {listed} mentioned in the document? Answer with the number{'s' if many else ''} only."
    )

    def build(n: int) -> str:
        return _insert([NOISE] * n, [(d, _needle(name, value)) for d, (name, value) in zip(depths, needles)])

    return question, answers, "all", build


def _niah_single(rng, seed, index):
    return _niah(rng, keys=1, values=1, queried=1)


def _niah_multikey(rng, seed, index):
    return _niah(rng, keys=4, values=1, queried=1)


def _niah_multivalue(rng, seed, index):
    return _niah(rng, keys=1, values=4, queried=1)


def _niah_multiquery(rng, seed, index):
    return _niah(rng, keys=4, values=1, queried=4)


def _vt(rng, seed, index, hops: int = 4):
    """RULER's variable tracking, one chain of `hops` assignments after the first."""
    names = list(dict.fromkeys("".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops * 4)))[: hops + 1]
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)  # in order: each assignment after the one it copies
    question = (
        f"Track the chain of variable assignments hidden in the document. Find all variables that are "
        f"assigned the value {value}, directly or through other variables. Answer with their names only."
    )

    def build(n: int) -> str:
        return _insert([NOISE] * n, list(zip(depths, chain)))

    return question, names, "all", build


def _cwe(rng, seed, index, common: int = 10, rare_per_block: int = 15, rare_words: int = 150):
    """The list cycles through blocks of all common words + the next rare ones, shuffled:
    each common word is 10x as frequent as any rare one (RULER: 30 vs 3), at every length."""
    chosen = rng.sample(WORDS, common + rare_words)
    frequent, rare = chosen[:common], chosen[common:]
    blocks = []
    for b in range(rare_words // rare_per_block):
        block = frequent + rare[b * rare_per_block : (b + 1) * rare_per_block]
        blocks.append(rng.sample(block, len(block)))
    stream = [word for block in blocks for word in block]
    question = f"What are the {common} most common words in the numbered list in the document? Answer with the words only."

    def build(n: int) -> str:
        # n words, cycling the blocks; n >= one block's worth keeps every common word in.
        n = max(n, common + rare_per_block)
        return " ".join(f"{i + 1}. {stream[i % len(stream)]}" for i in range(n))

    return question, frequent, "all", build


def _qa(rng, seed, index):
    """A sample question; the document's lines around the answer, cut to the length at a
    random depth, or the whole document padded with lines of the other samples."""
    questions = _questions()
    item = questions[random.Random(f"qa:{seed}").sample(range(len(questions)), len(questions))[index % len(questions)]]
    documents = _sample_lines()
    lines = documents[item["document"]]
    hit = next((i for answer in item["answers"] for i, line in enumerate(lines) if answer in line), None)
    if hit is None:
        raise KvcliError(f"samples/questions.jsonl: no answer to {item['question']!r} in {item['document']}")
    others = [line for name, doc in documents.items() if name != item["document"] for line in doc]
    depth = rng.random()

    def build(n: int) -> str:
        if n <= len(lines):
            start = min(max(0, hit - round(depth * (n - 1))), len(lines) - n)
            return "\n".join(lines[start : start + n])
        extra = [others[i % len(others)] for i in range(n - len(lines))]
        before = round(depth * len(extra))
        return "\n".join(extra[:before] + lines + extra[before:])

    return item["question"], item["answers"], "part", build


@lru_cache(maxsize=1)
def _questions() -> list[dict]:
    path = SAMPLES / "questions.jsonl"
    if not path.is_file():
        raise KvcliError(f"the qa task needs the sample documents and {path} (the samples/ folder of the kvcli repository)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _sample_lines() -> dict[str, list[str]]:
    from kvcli.documents import load_document

    names = list(dict.fromkeys(item["document"] for item in _questions()))
    return {name: [line for line in load_document(str(SAMPLES / name)).text.splitlines() if line.strip()] for name in names}


GENERATORS = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "vt": _vt,
    "cwe": _cwe,
    "qa": _qa,
}
