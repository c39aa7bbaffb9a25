"""The `kvcli` command line: parse, call kvcli.api, print. No model logic lives here.

stdout carries only the answer (streamed) or, with --json, one JSON object; everything
else (loading, progress, speed) goes to stderr and disappears with --quiet or when stderr
is not a terminal. Exit codes: 0 success, 1 bad input or runtime failure, 2 usage,
130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvcli.errors import KvcliError
from kvcli.methods import DEFAULT_METHOD, METHODS

app = typer.Typer(
    help="Ask questions of long documents with a local LLM whose KV cache is compressed by eviction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="The content-addressed store of compressed caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

stderr = Console(stderr=True, highlight=False)


# ---- shared options -------------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="KVCLI_MODEL", help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face model directory, or a model id in the local HF cache.")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="KVCLI_DEVICE", help="auto, cpu or cuda.")]
MethodOpt = Annotated[str, typer.Option("--method", envvar="KVCLI_METHOD", help=f"Compression method: {', '.join(METHODS)}.")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Fraction of document tokens kept (default 0.25 for compressing methods).")]
BudgetOpt = Annotated[Optional[int], typer.Option("--budget", help="Document tokens kept per KV head, on average (instead of --ratio).")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Ada-KV safeguard floor per head, as a fraction of the mean budget (default 0.2).")]
AgnosticOpt = Annotated[bool, typer.Option("--agnostic", help="Compress before seeing the question (the cache could answer any question).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed when sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (answer, timings, cache statistics) instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", envvar="KVCLI_PDF_PASSWORD", help="Password of an encrypted PDF.")]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", help="Tokens per prefill chunk (bounds activation memory).")]


class Reporter:
    """Progress and notes on stderr, only when someone is watching."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and stderr.is_terminal

    def note(self, message: str) -> None:
        if self.enabled:
            stderr.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet_errors:
            stderr.print(f"[yellow]warning:[/] {message}")

    quiet_errors = False

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


def _load_model(spec: str, device: str, reporter: Reporter):
    from kvcli.models import load_model

    with reporter.status(f"Loading model {spec} (the first run converts the embedded model: ~20 s)"):
        model = load_model(spec, device=device)
    reporter.note(f"[dim]model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), loaded in {model.load_seconds:.1f} s[/]")
    return model


def _load_document(source: str, password: str | None, reporter: Reporter):
    from kvcli.documents import load_document

    document = load_document(source, password=password)
    for warning in document.warnings:
        reporter.warn(f"{document.name}: {warning}")
    return document


def _print_text(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_question(
    *, source, question, model, device, method, ratio, budget, alpha, agnostic, max_new_tokens, temperature, seed, json_out, quiet, password, chunk_size
) -> None:
    from kvcli import api
    from kvcli.methods import make_press

    reporter = Reporter(quiet or json_out and not stderr.is_terminal)
    reporter.quiet_errors = quiet
    generation = api.Generation(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    press = make_press(method, ratio=ratio, budget=budget, alpha=alpha)
    document = _load_document(source, password, reporter)
    loaded = _load_model(model, device, reporter)
    with reporter.layers(f"Reading {document.name}") as progress:
        result, compressed = api.ask(
            loaded,
            document,
            question,
            press=press,
            agnostic=agnostic,
            generation=generation,
            chunk_size=chunk_size,
            progress=progress,
            on_text=None if json_out else _print_text,
        )
    if json_out:
        sys.stdout.write(json.dumps(api.report(loaded, document, compressed, result)) + "\n")
        return
    sys.stdout.write("\n")
    stats = compressed.stats()
    reporter.note(
        f"[dim]{stats['document_tokens']} document tokens, kept {stats['kept_fraction']:.0%} ({press.name}); "
        f"prefill {compressed.prefill.prefill_seconds:.2f} s, first token {result.ttft_seconds:.2f} s, "
        f"{result.decode_tokens_per_second:.1f} tokens/s[/]"
    )


def _guard(fn):
    """Turn KvcliError into a one-line message and exit code 1."""
    try:
        fn()
    except KvcliError as exc:
        stderr.print(f"[red]kvcli: error:[/] {exc}", soft_wrap=True, markup=True)
        raise typer.Exit(1)


# ---- commands -------------------------------------------------------------------------


@app.command()
def ask(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, or - for stdin.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    alpha: AlphaOpt = None,
    agnostic: AgnosticOpt = False,
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    password: PasswordOpt = None,
    chunk_size: ChunkOpt = 2048,
) -> None:
    """Answer a question about a document."""
    _guard(lambda: _run_question(
        source=document, question=question, model=model, device=device, method=method, ratio=ratio, budget=budget,
        alpha=alpha, agnostic=agnostic, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        json_out=json_out, quiet=quiet, password=password, chunk_size=chunk_size,
    ))


@app.command()
def summarize(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, or - for stdin.")],
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: MethodOpt = DEFAULT_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    alpha: AlphaOpt = None,
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    password: PasswordOpt = None,
    chunk_size: ChunkOpt = 2048,
) -> None:
    """Summarize a document (compression is question-agnostic: there is no question)."""
    from kvcli.prompts import SUMMARY_INSTRUCTION

    _guard(lambda: _run_question(
        source=document, question=SUMMARY_INSTRUCTION, model=model, device=device, method=method, ratio=ratio,
        budget=budget, alpha=alpha, agnostic=True, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        json_out=json_out, quiet=quiet, password=password, chunk_size=chunk_size,
    ))


@app.command()
def info(
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the model, device, dtype, context length and library versions."""

    def run():
        from kvcli.info import model_info

        reporter = Reporter(quiet)
        loaded = _load_model(model, device, reporter)
        details = model_info(loaded)
        if json_out:
            sys.stdout.write(json.dumps(details) + "\n")
        else:
            width = max(len(k) for k in details)
            for key, value in details.items():
                sys.stdout.write(f"{key:<{width}}  {value}\n")

    _guard(run)


def _quiet_libraries() -> None:
    """transformers' progress bars and advice would pollute stderr; we report our own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main() -> None:
    import click

    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
    except click.exceptions.Abort:
        stderr.print("kvcli: interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        stderr.print("kvcli: interrupted")
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
