"""`kvcli eval`: task generators, scoring, fidelity metrics, and the resumable sweep on a tiny random model."""

import json
import re
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from kvcli import api
from kvcli.cli.main import app
from kvcli.compress.methods import make_press
from kvcli.errors import KvcliError
from kvcli.eval import fidelity, sweep, tasks
from tests.support import tiny_loaded


def words(document: str, question: str) -> int:
    """A stand-in tokenizer for the generators: one token per word."""
    return len(document.split()) + len(question.split()) + 20  # + a template's worth


def generate(task, length=600, seed=0, index=0):
    return tasks.generate(task, length=length, seed=seed, index=index, prompt_tokens=words)


# ---- tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generator_is_deterministic_per_seed(task):
    assert generate(task) == generate(task)
    others = [generate(task, seed=1), generate(task, index=1)]
    assert all((o.context, o.question) != (generate(task).context, generate(task).question) for o in others)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [300, 1500])
def test_expected_answers_are_in_the_text_and_it_fits(task, length):
    sample = generate(task, length=length)
    found = [answer in sample.context for answer in sample.answers]
    assert all(found) if sample.metric == "all" else any(found)
    used = words(sample.context, sample.question) + sample.max_new_tokens
    assert length - 60 < used <= length  # filled up to the length, one filler unit short at most


@pytest.mark.parametrize("task", ["niah_multivalue", "vt", "qa"])
def test_a_sample_keeps_its_question_and_answers_at_every_length(task):
    short, long = generate(task, length=400), generate(task, length=1600)
    assert (short.question, short.answers) == (long.question, long.answers)
    assert len(long.context) > 2 * len(short.context)


def test_variable_chain_is_in_order():
    sample = generate("vt", length=2000)
    first, *rest = sample.answers
    value = re.search(rf"VAR {first} = (\d+)", sample.context).group(1)
    assert value in sample.question
    places = [sample.context.index(f"VAR {first} = {value}")]
    for before, after in zip(sample.answers, rest):
        places.append(sample.context.index(f"VAR {after} = VAR {before}"))
    assert places == sorted(places)


def test_common_words_are_the_most_common():
    sample = generate("cwe", length=3000)
    listed = re.findall(r"\d+\. (\w+)", sample.context)
    top = [word for word, _ in Counter(listed).most_common(len(sample.answers))]
    assert sorted(top) == sorted(sample.answers)
    counts = Counter(listed)
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)


def test_needles_of_every_key_are_planted():
    sample = generate("niah_multiquery", length=1500)
    assert len(sample.answers) == 4 and sample.context.count("special magic number") == 4
    for key in re.findall(r"for ([a-z]+-[a-z]+)", sample.context):
        assert key in sample.question


def test_too_short_a_length_is_an_error():
    with pytest.raises(KvcliError, match="too short"):
        generate("niah_single", length=40)
    with pytest.raises(KvcliError, match="unknown task"):
        generate("needle")


# ---- scoring --------------------------------------------------------------------------


def test_string_match_all_gives_partial_credit_case_insensitively():
    assert tasks.match_all("The numbers are 123 and 456.", ("123", "456", "789", "000")) == 0.5
    assert tasks.match_all("VAR abcde and FGHIJ", ("ABCDE", "fghij")) == 1.0
    assert tasks.match_all("nothing here", ("123",)) == 0.0


def test_string_match_part_needs_one():
    assert tasks.match_part("Edwin Tull, I think", ("Edwin Tull", "Tull")) == 1.0
    assert tasks.match_part("tull.", ("Edwin Tull", "Tull")) == 1.0
    assert tasks.match_part("Penhallow", ("Edwin Tull", "Tull")) == 0.0


def test_score_uses_the_tasks_metric():
    needles = tasks.Sample("niah_multivalue", "", "", ("1", "2"), "all", 8)
    qa = tasks.Sample("qa", "", "", ("1", "2"), "part", 8)
    assert tasks.score(needles, "only 1") == 0.5
    assert tasks.score(qa, "only 1") == 1.0


# ---- fidelity -------------------------------------------------------------------------


def test_next_token_agreement():
    logits = torch.randn(5, 50)
    assert fidelity.next_token_agreement(logits, logits) == pytest.approx((1.0, 0.0), abs=1e-6)
    other = logits.clone()
    other[0] = -logits[0]  # a different top token, and a different distribution, at step 0 only
    top1, kl = fidelity.next_token_agreement(logits, other)
    assert top1 == pytest.approx(0.8) and kl > 0.1
    p = torch.log_softmax(logits[0], -1)
    assert kl == pytest.approx((p.exp() * (p - torch.log_softmax(other[0], -1))).sum().item() / 5, rel=1e-4)


QUESTION = "Which word follows delta?"


@pytest.fixture(scope="module")
def tiny():
    # One thread: the tiny model's ops are too small to split, and on a busy two-core
    # machine a second thread makes every op wait for a core (10x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_loaded()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    document = sweep._document(tasks.Sample("t", "Alpha bravo charlie delta echo. " * 12, "", (), "all", 6), "doc")
    full = api.read(tiny, document, make_press("full"))
    return document, fidelity.reference(tiny, full, QUESTION, max_new_tokens=6)


@pytest.mark.parametrize("mode", ["aware", "agnostic"])
def test_a_cache_that_keeps_everything_is_perfectly_faithful(tiny, tiny_reference, mode):
    document, ref = tiny_reference
    whole = api.read(tiny, document, make_press("snapkv", ratio=1.0), question=QUESTION if mode == "aware" else None)
    measured = fidelity.compare(tiny, ref, whole)
    assert measured.top1 == 1.0 and measured.kl < 1e-6
    assert max(measured.attention_error) < 1e-5


@pytest.mark.parametrize("mode", ["aware", "agnostic"])
def test_eviction_shows_in_every_measure(tiny, tiny_reference, mode):
    document, ref = tiny_reference
    evicted = api.read(tiny, document, make_press("random", ratio=0.1), question=QUESTION if mode == "aware" else None)
    measured = fidelity.compare(tiny, ref, evicted)
    assert measured.kl > 1e-4
    assert len(measured.attention_error) == 3 and min(measured.attention_error) > 1e-3


def test_reference_answer_is_the_full_cache_greedy_answer(tiny, tiny_reference):
    document, ref = tiny_reference
    answer, _ = api.ask(tiny, document, QUESTION, generation=api.Generation(max_new_tokens=6), agnostic=True)
    assert ref.answer == answer.answer
    assert ref.logits.shape == (ref.steps, 256) and ref.logits[0].argmax() == ref.answer_ids[0]


# ---- the sweep ------------------------------------------------------------------------

SWEEP = dict(tasks=["niah_single", "vt"], lengths=[700], methods=["snapkv", "streaming"], ratios=[1.0, 0.25], samples=1, max_new_tokens=3)
RUNS = 2 * (1 + 2 * 2 * 2)  # groups x (reference + methods x ratios x modes)


def keys(directory) -> list[tuple]:
    return [sweep.row_key(json.loads(line)) for line in (directory / sweep.RESULTS_FILE).read_text().splitlines()]


def test_sweep_end_to_end(tiny, tmp_path):
    summary = sweep.evaluate(tiny, sweep.Sweep(**SWEEP), tmp_path)
    assert summary["runs_made"] == summary["runs"] == RUNS
    assert len(set(keys(tmp_path))) == RUNS
    rows = [json.loads(line) for line in (tmp_path / sweep.RESULTS_FILE).read_text().splitlines()]
    for row in rows:
        if row["ratio"] == 1.0:  # keeps the whole document: it is the full cache
            assert (row["agrees"], row["top1"], row["kl"], row["compressed"]) == (True, 1.0, 0.0, False)
        else:
            assert row["compressed"] and 0.2 < row["kept_fraction"] < 0.3 and row["kl"] > 0
            assert len(row["attention_error"]) == 3
        assert 0.0 <= row["score"] <= 1.0 and row["length"] == 700 and row["fingerprint"] == "f" * 64
    assert (tmp_path / "results.csv").read_text().count("\n") == RUNS + 1
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| snapkv" in (tmp_path / "summary.md").read_text()
    overall = {(e["method"], e["ratio"], e["mode"]): e for e in summary["overall"]}
    assert overall[("full", 1.0, "-")]["runs"] == 2 and overall[("snapkv", 0.25, "aware")]["runs"] == 2


def test_interrupted_sweep_resumes_without_duplicates_or_recomputation(tiny, tmp_path, monkeypatch):
    def interrupt_after(limit):
        def progress(done, total, label):
            if done == limit:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):
        sweep.evaluate(tiny, sweep.Sweep(**SWEEP), tmp_path, progress=interrupt_after(5))
    first = (tmp_path / sweep.RESULTS_FILE).read_text()
    assert len(first.splitlines()) == 5 and (tmp_path / "results.csv").exists()  # reports of what finished
    with open(tmp_path / sweep.RESULTS_FILE, "a") as f:
        f.write('{"task": "vt", "len')  # a crash in the middle of a write

    reads = []
    real_read = api.read
    monkeypatch.setattr(api, "read", lambda *a, **k: reads.append(a[2].name) or real_read(*a, **k))
    summary = sweep.evaluate(tiny, sweep.Sweep(**SWEEP), tmp_path)
    assert (tmp_path / sweep.RESULTS_FILE).read_text().startswith(first)
    assert len(keys(tmp_path)) == len(set(keys(tmp_path))) == RUNS
    assert summary["runs_made"] == RUNS - 5
    # First group: 5 rows done (reference, snapkv 1 and 0.25 aware, streaming 1 and 0.25 aware) -> its
    # reference is read again, but only its 2 agnostic compressions run; the second group runs all 4.
    assert reads.count("full") == 2 and len(reads) - 2 == 2 + 4

    reads.clear()
    assert sweep.evaluate(tiny, sweep.Sweep(**SWEEP), tmp_path)["runs_made"] == 0 and reads == []


def test_worker_processes_give_the_rows_one_process_gives(tiny, tmp_path):
    settings = {**SWEEP, "methods": ["snapkv"], "ratios": [0.25]}
    alone = sweep.evaluate(tiny, sweep.Sweep(**settings), tmp_path / "one")
    shared = sweep.evaluate(tiny, sweep.Sweep(**settings), tmp_path / "two", workers=sweep.Workers(2, tiny_loaded))
    assert alone["runs_made"] == shared["runs_made"] == 2 * 3

    def rows(directory):
        lines = (directory / sweep.RESULTS_FILE).read_text().splitlines()
        return {sweep.row_key(row): (row["answer"], row["score"], row["kl"]) for row in map(json.loads, lines)}

    assert rows(tmp_path / "one") == rows(tmp_path / "two")


def test_results_of_another_model_are_not_mixed_in(tiny, tmp_path):
    sweep.evaluate(tiny, sweep.Sweep(**{**SWEEP, "tasks": ["vt"], "methods": ["streaming"], "ratios": [1.0]}), tmp_path)
    with pytest.raises(KvcliError, match="another fingerprint"):
        sweep.Results(tmp_path, {"fingerprint": "0" * 64, "dtype": "float32", "max_new_tokens_override": 3})


@pytest.mark.parametrize(
    "change, message",
    [({"tasks": ["needle"]}, "unknown task"), ({"methods": ["bogus"]}, "unknown method"), ({"ratios": [1.5]}, "--ratio"),
     ({"samples": 0}, "--samples"), ({"modes": ["sideways"]}, "unknown mode")],
)
def test_sweep_rejects_bad_settings(change, message):
    with pytest.raises(KvcliError, match=message):
        sweep.Sweep(**{**SWEEP, **change})


def test_length_beyond_the_context_is_an_error(tiny, tmp_path):
    with pytest.raises(KvcliError, match="context of 4096"):
        sweep.evaluate(tiny, sweep.Sweep(**{**SWEEP, "lengths": [8192]}), tmp_path)


# ---- the command ----------------------------------------------------------------------


def test_eval_has_help():
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "--lengths" in result.output and "--agnostic" in result.output


@pytest.mark.parametrize(
    "args, message",
    [(["--tasks", "needle"], "unknown task"), (["--lengths", "2x"], "--lengths"), (["--ratios", "half"], "--ratios"),
     (["--methods", "bogus"], "unknown method")],
)
def test_bad_input_is_one_line_exit_1(args, message):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_eval_command_prints_tables_or_json(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("kvcli.cli.common.load_model_reporting", lambda spec, device, reporter: tiny)
    args = ["eval", "--tasks", "niah_single", "--lengths", "700", "--methods", "snapkv", "--ratios", "1,0.25",
            "--samples", "1", "--max-new-tokens", "3", "--agnostic", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Score % per task" in result.stdout and "snapkv" in result.stdout
    result = CliRunner().invoke(app, [*args, "--json"])  # everything is done: resumes with nothing to run
    summary = json.loads(result.stdout)
    assert summary["runs_made"] == 0 and summary["runs"] == 3
    assert {e["mode"] for e in summary["overall"]} == {"-", "agnostic"}


def test_bootstrap_intervals_and_the_share_of_the_full_cache():
    from kvcli.eval.report import aggregate, bootstrap

    assert bootstrap([(0.5, 1.0)] * 10) == (0.5, 0.5)
    coin = [(float(i % 2), 1.0) for i in range(40)]
    lo, hi = bootstrap(coin)
    assert lo < 0.5 < hi and hi - lo < 0.4
    wide = bootstrap(coin[:8])
    assert wide[1] - wide[0] > hi - lo  # fewer samples, wider interval
    rows = []
    for i in range(20):
        key = {"task": "t", "length": 1024, "seed": 0, "sample": i, "ratio": 0.1, "mode": "aware"}
        rows.append({**key, "method": "full", "ratio": 1.0, "score": 1.0 if i < 10 else 0.0})
        rows.append({**key, "method": "snapkv", "score": 1.0 if i < 5 else 0.0})
    entry = next(e for e in aggregate(rows) if e["method"] == "snapkv")
    assert entry["of_full"] == 0.5 and entry["score"] == 0.25
    assert entry["of_full_ci"][0] < 0.5 < entry["of_full_ci"][1]
