"""The `kvcli eval` command: what compression costs in quality, on your model, offline.

Thin: parse the lists, load the model, call kvcli.eval.sweep.evaluate, print the tables (or
one JSON object with --json). Progress with an ETA goes to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from kvcli.errors import KvcliError
from kvcli.eval.tasks import TASKS

DEFAULT_METHODS = "snapkv,pyramid,ada-snapkv,dynamic,kvzip,criticalkv,defensivekv,streaming,random"
DEFAULT_RATIOS = "1,0.5,0.25,0.1"


def parse_length(text: str) -> int:
    """Tokens: 2048, or 2k (= 2048, as RULER counts)."""
    try:
        return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)
    except ValueError:
        raise KvcliError(f"--lengths: cannot read {text!r}; give tokens like 2048 or 2k") from None


def parse_ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KvcliError(f"--ratios: cannot read {text!r}; give fractions like 0.25") from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        *,
        tasks: Annotated[str, typer.Option("--tasks", help=f"Comma-separated tasks: {', '.join(TASKS)}.")] = ",".join(TASKS),
        lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated prompt lengths in tokens, answer included (2k = 2048).")] = "2k",
        methods: Annotated[str, typer.Option("--methods", help="Comma-separated compression methods.")] = DEFAULT_METHODS,
        ratios: Annotated[str, typer.Option("--ratios", help="Comma-separated kept ratios of the document (1 = the full cache).")] = DEFAULT_RATIOS,
        aware: Annotated[bool, typer.Option("--aware", help="Question-aware compression only (with --agnostic too: both, the default).")] = False,
        agnostic: Annotated[bool, typer.Option("--agnostic", help="Question-agnostic compression only (with --aware too: both, the default).")] = False,
        samples: Annotated[int, typer.Option("--samples", help="Samples per task and length.")] = 2,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the generated samples.")] = 0,
        max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Answer budget (default: each task's own).")] = None,
        out: Annotated[str, typer.Option("--out", "-o", help="Folder for results.jsonl, results.csv, summary.json/.md and plot.png; a rerun resumes it.")] = "kvcli-eval",
        model: Annotated[str, typer.Option("--model", "-m", envvar="KVCLI_MODEL", help="Model spec, as for `kvcli ask`.")] = "default",
        device: Annotated[str, typer.Option("--device", envvar="KVCLI_DEVICE", help="auto, cpu or cuda.")] = "auto",
        workers: Annotated[int, typer.Option("--workers", help="Processes, each with its own copy of the model (a small model on a GPU: one per few CPU cores).")] = 1,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object instead of tables.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")] = False,
    ) -> None:
        """Measure what compression costs: RULER-style tasks and fidelity to the full cache, resumable."""
        from kvcli.cli.common import Reporter, guard, load_model_reporting

        def run():
            from rich.console import Console

            from kvcli.eval import report as evalreport
            from kvcli.eval.sweep import MODES, Sweep, Workers, evaluate
            from kvcli.models import load_model

            modes = [m for m, chosen in zip(MODES, (aware, agnostic)) if chosen] or list(MODES)
            sweep = Sweep(
                tasks=_items(tasks), lengths=[parse_length(x) for x in _items(lengths)], methods=_items(methods),
                ratios=[parse_ratio(x) for x in _items(ratios)], modes=modes, samples=samples, seed=seed,
                max_new_tokens=max_new_tokens,
            )
            if workers < 1:
                raise KvcliError("--workers must be at least 1")
            reporter = Reporter(quiet)
            loaded = load_model_reporting(model, device, reporter)
            with _progress_bar(reporter) as progress:
                summary = evaluate(loaded, sweep, out, progress=progress, workers=Workers(workers, functools.partial(load_model, model, device=device)))
            if json_out:
                sys.stdout.write(json.dumps(summary) + "\n")
            else:
                # Piped into a file, rich would wrap at 80 columns and cut the method names.
                console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
                for table in evalreport.tables(summary):
                    console.print(table)
            reporter.note(f"[dim]{summary['runs_made']} runs made, {summary['runs']} in {out}/results.jsonl; wrote {', '.join(summary['files'])}[/]")

        guard(run)


@contextmanager
def _progress_bar(reporter):
    """A bar over runs with an ETA on stderr; yields the callback kvcli.eval.sweep.run expects."""
    if not reporter.enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kvcli.cli.common import stderr

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task("eval", total=None)
        yield lambda done, total, label: bar.update(task, completed=done, total=total, description=label)
