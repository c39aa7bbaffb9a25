"""What every kvcli command shares: the stderr console, progress and notes, one-line errors."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvcli.errors import KvcliError

stderr = Console(stderr=True, highlight=False)


class Reporter:
    """Progress and notes on stderr, only when someone is watching."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.enabled = not quiet and stderr.is_terminal

    def note(self, message: str) -> None:
        if self.enabled:
            stderr.print(message)

    def warn(self, message: str) -> None:
        """Warnings show even when stderr is not a terminal (they matter in pipes), not under --quiet."""
        if not self.quiet:
            stderr.print(f"[yellow]warning:[/] {message}")

    @contextmanager
    def status(self, message: str):
        if not self.enabled:
            yield
            return
        with stderr.status(message):
            yield

    @contextmanager
    def layers(self, description: str):
        """A progress bar over model layers; yields the callback prefill expects."""
        if not self.enabled:
            yield None
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)


def load_model_reporting(spec: str, device: str, reporter: Reporter):
    from kvcli.models import load_model

    with reporter.status(f"Loading model {spec} (the first run converts the embedded model: ~20 s)"):
        model = load_model(spec, device=device)
    reporter.note(f"[dim]model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), loaded in {model.load_seconds:.1f} s[/]")
    return model


def guard(fn):
    """KvcliError -> one line on stderr and exit 1; Ctrl-C -> exit 130; never a traceback."""
    try:
        fn()
    except KvcliError as exc:
        stderr.print(f"[red]kvcli: error:[/] {exc}", soft_wrap=True, markup=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        stderr.print("kvcli: interrupted")
        raise typer.Exit(130)
