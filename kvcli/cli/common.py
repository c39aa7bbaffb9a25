"""What every kvcli command shares: the stderr console, progress and notes, one-line errors."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvcli.errors import KvcliError

stderr = Console(stderr=True, highlight=False)
_IMPORTED = time.perf_counter()  # the CLI's entry: the fallback for when the process started


def process_started() -> float:
    """When this process started, on the time.perf_counter() clock: /proc/self/stat's start
    time (10 ms resolution, so interpreter start-up and imports are counted), or, where there
    is no /proc, when the CLI was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, counted after "pid (comm)"
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    now = time.perf_counter()
    return now - age if 0 <= age <= now - _IMPORTED + 3600 else _IMPORTED


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


def load_model_reporting(spec: str, device: str, reporter: Reporter, dtype: str = "auto", *, plain: bool = False):
    """Load the model (dtype: a --dtype value, see kvcli.precision) and say so on stderr.
    plain: only answering from .kvc files (kvcli.models.load_model)."""
    from kvcli.models import load_model

    with reporter.status(f"Loading model {spec} (the first run converts the embedded model: ~20 s)"):
        model = load_model(spec, device=device, dtype=dtype, plain=plain)
        if model.device.type == "cuda":  # a .kvc load's page-locked staging, paid with the model's load, not by the first load
            from kvcli.store.kvcfile import prepare_staging

            prepare_staging(model.device)
    phases = model.precision
    shown = phases.decode if model.plain else phases.read if phases.read == phases.decode else f"reading {phases.read}, decoding {phases.decode}"
    how = ", plain torch decoder" if model.plain else ""
    reporter.note(f"[dim]model {model.name} on {model.device} ({shown}{how}), loaded in {model.load_seconds:.1f} s[/]")
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
