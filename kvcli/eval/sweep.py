"""The eval sweep: tasks x lengths x samples, each read with every method, ratio and mode,
scored and compared with the full cache; one result row per run, resumable.

Per (task, length, sample) the full cache is read once, question-agnostically (an aware
prompt is the same tokens, so it serves both modes), and answers greedily: that is the
reference, recorded as method "full". Each (method, ratio, mode) then reads the document
compressed, is compared with the reference (kvcli.eval.fidelity), answers and is scored
(kvcli.eval.tasks). A press that keeps the whole document (ratio 1) *is* the full cache, so
its row is the reference's rather than a recomputation.

Rows are keyed by (task, length, method, ratio, mode, seed, sample) and appended to
results.jsonl as each run finishes, one line per write, fsynced: an interrupted sweep
loses at most the run in progress, and the same command run again skips every key
already in the file. A last line cut short by a crash is dropped on reopening.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvcli import api
from kvcli.eval import fidelity
from kvcli.eval import tasks
from kvcli.documents import Document, PageSpan
from kvcli.errors import KvcliError
from kvcli.compress.methods import METHODS, make_press
from kvcli.models import LoadedModel
from kvcli.prompts import PromptLayout
from kvcli.eval.report import KEY, write_reports
from kvcli.eval.tasks import TASKS

MODES = ("aware", "agnostic")
REFERENCE = ("full", 1.0, "-")  # (method, ratio, mode) of the full-cache row
RESULTS_FILE = "results.jsonl"

Progress = Callable[[int, int, str], None]  # (runs done, runs in this sweep, what runs now)


@dataclass
class Sweep:
    tasks: list[str]
    lengths: list[int]  # tokens: prompt + answer budget, as RULER counts
    methods: list[str]
    ratios: list[float]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    samples: int = 1
    seed: int = 0
    max_new_tokens: int | None = None  # None: each task's own budget

    def __post_init__(self):
        for task in self.tasks:
            if task not in TASKS:
                raise KvcliError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
        for method in self.methods:
            if method not in METHODS:
                raise KvcliError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
        for ratio in self.ratios:
            make_press("snapkv", ratio=ratio)  # the same check and message as everywhere
        for mode in self.modes:
            if mode not in MODES:
                raise KvcliError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        if any(length < 1 for length in self.lengths):
            raise KvcliError("every length must be at least 1 token")
        if self.samples < 1:
            raise KvcliError("--samples must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise KvcliError("--max-new-tokens must be at least 1")
        if not (self.tasks and self.lengths and self.methods and self.ratios and self.modes):
            raise KvcliError("nothing to run: give at least one task, length, method, ratio and mode")

    def groups(self) -> list[tuple[str, int, int]]:
        """(task, length, sample index): one generated sample and its reference each.

        Sample-major, so a sweep stopped at any point has covered every task and length
        about equally (and a resumed one fills them in evenly)."""
        return [(task, length, i) for i in range(self.samples) for length in self.lengths for task in self.tasks]

    def variants(self) -> list[tuple[str, float, str]]:
        """(method, ratio, mode) run on every sample; "full" is the reference, run anyway."""
        return [(m, r, mode) for mode in self.modes for m in self.methods if m != "full" for r in self.ratios]

    def key(self, group: tuple[str, int, int], variant: tuple[str, float, str]) -> tuple:
        (task, length, index), (method, ratio, mode) = group, variant
        return (task, length, method, float(ratio), mode, self.seed, index)


def row_key(row: dict) -> tuple:
    return tuple(float(row[k]) if k == "ratio" else row[k] for k in KEY)


class Results:
    """results.jsonl in `directory`: the rows so far, and appends that survive a crash.

    `identity` (model fingerprint, dtype, answer budget) must match every row already
    there: results of another model or setting are never mixed into one sweep.
    """

    def __init__(self, directory: str | os.PathLike, identity: dict):
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE
        self.identity = identity
        self.rows = self._load()
        self.done = {row_key(row) for row in self.rows}

    def _load(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise KvcliError(f"cannot read {self.path}: {exc.strerror}") from None
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # a crash cut the last line short: drop it
            os.truncate(self.path, len(complete))
        rows = []
        for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                row_key(row)
            except (ValueError, KeyError, TypeError):
                raise KvcliError(f"{self.path}:{number} is not a result row; move the file away to start over") from None
            differs = [k for k, v in self.identity.items() if row.get(k) != v]
            if differs:
                raise KvcliError(
                    f"{self.path} holds results of another {', '.join(differs)} ({', '.join(f'{k}={row.get(k)}' for k in differs)}); "
                    "use another --out, or remove it to start over"
                )
            rows.append(row)
        return rows

    def append(self, row: dict) -> None:
        """One line, one write, fsynced: either the whole row is there or nothing is."""
        row = {**row, **self.identity}
        self.directory.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.append(row)
        self.done.add(row_key(row))


def identity(model: LoadedModel, sweep: Sweep) -> dict:
    return {"fingerprint": model.fingerprint, "dtype": str(model.dtype).removeprefix("torch."), "max_new_tokens_override": sweep.max_new_tokens}


def run(model: LoadedModel, sweep: Sweep, results: Results, *, progress: Progress | None = None, workers: Workers | None = None) -> int:
    """Run every (group, variant) not in `results` yet, appending rows; returns runs made.

    workers: run groups in that many processes, each with its own copy of the model (a small
    model leaves a GPU mostly idle from one process: each run is bound by Python and kernel
    launches). Rows still reach results.jsonl from this process only, a group at a time."""
    limit = model.context_length
    for length in sweep.lengths:
        if limit and length > limit:
            raise KvcliError(f"length {length} is more than {model.name}'s context of {limit} tokens")
    plan = []  # (group, variants to run, whether the reference row is missing)
    for group in sweep.groups():
        pending = [v for v in sweep.variants() if sweep.key(group, v) not in results.done]
        missing_reference = sweep.key(group, REFERENCE) not in results.done
        if pending or missing_reference:
            plan.append((group, pending, missing_reference))
    total = sum(len(pending) + missing for _, pending, missing in plan)
    done = 0
    if workers is not None and workers.count > 1 and len(plan) > 1:
        import multiprocessing

        # spawn: CUDA cannot be used in a forked child
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers.count, len(plan)), initializer=_start_worker, initargs=(workers, sweep)) as pool:
            if progress:
                progress(done, total, f"{len(plan)} samples in {min(workers.count, len(plan))} processes")
            for group, rows in pool.imap_unordered(_worker_group, plan):
                for row in rows:
                    results.append(row)
                done += len(rows)
                if progress:
                    task, length, index = group
                    progress(done, total, f"{task} {length} #{index} done")
    else:
        for group, pending, missing_reference in plan:
            for row in _group_rows(model, sweep, group, pending, missing_reference, progress=progress, done=done, total=total):
                results.append(row)
                done += 1
    if progress:
        progress(done, total, "done")
    return done


@dataclass(frozen=True)
class Workers:
    """`count` processes, each loading its model with `load` (picklable: a module-level
    function or a functools.partial of one, e.g. of kvcli.models.load_model)."""

    count: int
    load: Callable[[], LoadedModel]


_worker: dict = {}  # the model and sweep of this worker process


def _start_worker(workers: Workers, sweep: Sweep) -> None:
    import torch

    torch.set_num_threads(1)  # the processes share the machine's cores
    _worker.update(model=workers.load(), sweep=sweep)


def _worker_group(job) -> tuple[tuple[str, int, int], list[dict]]:
    group, pending, missing_reference = job
    return group, list(_group_rows(_worker["model"], _worker["sweep"], group, pending, missing_reference))


def _group_rows(model: LoadedModel, sweep: Sweep, group, pending, missing_reference, *, progress: Progress | None = None, done: int = 0, total: int = 0):
    """The rows of one (task, length, sample): its reference (if missing), then each variant."""
    task, length, index = group
    label = f"{task} {length} #{index}"
    if progress:
        progress(done, total, f"{label}: full cache")
    sample = make_sample(model, sweep, group)
    document = _document(sample, f"{task}-{length}-{sweep.seed}-{index}")
    reference, reference_row = _reference(model, sample, document)
    if missing_reference:
        yield {**_fields(sweep, group, REFERENCE), "model": model.name, **reference_row}
        done += 1
    for variant in pending:
        method, ratio, mode = variant
        if progress:
            progress(done, total, f"{label}: {method} {ratio:g} {mode}")
        press = make_press(method, ratio=ratio)
        if press.budget_for(reference_row["document_tokens"]) is None:
            row = {**reference_row, "seconds": 0.0}
        else:
            row = _compressed_run(model, sample, document, press, mode, reference)
        yield {**_fields(sweep, group, variant), "model": model.name, **row}
        done += 1


def make_sample(model: LoadedModel, sweep: Sweep, group: tuple[str, int, int]) -> tasks.Sample:
    task, length, index = group

    def prompt_tokens(document: str, question: str) -> int:
        return len(PromptLayout.build(model.tokenizer, document, question).all_ids)

    return tasks.generate(task, length=length, seed=sweep.seed, index=index, prompt_tokens=prompt_tokens, max_new_tokens=sweep.max_new_tokens)


def _document(sample: tasks.Sample, name: str) -> Document:
    text = sample.context
    return Document(name=name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), pages=[PageSpan(1, 0, len(text))])


def _fields(sweep: Sweep, group: tuple[str, int, int], variant: tuple[str, float, str]) -> dict:
    return dict(zip(KEY, sweep.key(group, variant)))


def _reference(model: LoadedModel, sample: tasks.Sample, document: Document) -> tuple[fidelity.Reference, dict]:
    started = time.perf_counter()
    full = api.read(model, document, make_press("full"), headroom_tokens=sample.max_new_tokens)
    reference = fidelity.reference(model, full, sample.question, sample.max_new_tokens)
    row = _measures(sample, reference.answer, reference.answer, full.stats(), compressed=False, seconds=time.perf_counter() - started)
    layers = len(full.cache.layers)
    row.update(top1=1.0, kl=0.0, attention_error=[0.0] * layers, attention_error_mean=0.0)
    return reference, row


def _compressed_run(model: LoadedModel, sample: tasks.Sample, document: Document, press, mode: str, reference: fidelity.Reference) -> dict:
    started = time.perf_counter()
    compressed = api.read(model, document, press, question=sample.question if mode == "aware" else None, headroom_tokens=sample.max_new_tokens)
    measured = fidelity.compare(model, reference, compressed)  # before answering: an aware answer consumes the cache
    (answer,) = api.answer(model, compressed, [sample.question], api.Generation(max_new_tokens=sample.max_new_tokens))
    row = _measures(sample, answer.answer, reference.answer, compressed.stats(), compressed=True, seconds=time.perf_counter() - started)
    errors = measured.attention_error
    row.update(
        top1=measured.top1,
        kl=measured.kl,
        attention_error=errors,
        attention_error_mean=sum(errors) / len(errors) if errors else None,
    )
    return row


def _measures(sample: tasks.Sample, answer: str, reference_answer: str, stats: dict, *, compressed: bool, seconds: float) -> dict:
    return {
        "score": tasks.score(sample, answer),
        "agrees": _normalize(answer) == _normalize(reference_answer),
        "compressed": compressed,
        "kept_fraction": stats["kept_fraction"],
        "document_tokens": stats["document_tokens"],
        "max_new_tokens": sample.max_new_tokens,
        "answer": answer,
        "reference_answer": reference_answer,
        "expected": list(sample.answers),
        "seconds": round(seconds, 3),
    }


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def evaluate(model: LoadedModel, sweep: Sweep, directory: str | os.PathLike, *, progress: Progress | None = None, workers: Workers | None = None) -> dict:
    """Run `sweep` into `directory`, resuming what is there, and write the reports (also
    when interrupted). Returns the summary of every row in the folder (kvcli.eval.report),
    with `runs_made` by this call and the report `files`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise KvcliError(f"--out {directory} exists and is not a folder")
    results = Results(directory, identity(model, sweep))
    made = 0
    try:
        made = run(model, sweep, results, progress=progress, workers=workers)
    finally:  # an interrupted sweep still gets reports of what it finished
        summary = {}
        if results.rows:
            lengths = ",".join(str(n) for n in sorted({row["length"] for row in results.rows}))
            title = f"{model.name} ({identity(model, sweep)['dtype']}), lengths {lengths}, seed {sweep.seed}"
            summary = write_reports(directory, results.rows, title)
    return {**summary, "runs_made": made}
