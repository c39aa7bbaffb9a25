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
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from kvcli.cli import chat as chat_cli
from kvcli.cli import eval as eval_cli
from kvcli.cli import serve as serve_cli
from kvcli.cli.common import Reporter, guard, load_model_reporting, process_started, stderr
from kvcli.errors import KvcliError
from kvcli.compress.methods import DEFAULT_AGNOSTIC_METHOD, DEFAULT_AWARE_METHOD, METHODS, default_method

app = typer.Typer(
    help="Ask questions of long documents with a local LLM whose KV cache is compressed by eviction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="The content-addressed store of compressed caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")



# ---- shared options -------------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="KVCLI_MODEL", help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face model directory, or a model id in the local HF cache.")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="KVCLI_DEVICE", help="auto, cpu or cuda.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", envvar="KVCLI_METHOD", help=f"Compression method: {', '.join(METHODS)} (default: {DEFAULT_AWARE_METHOD} question-aware; {DEFAULT_AGNOSTIC_METHOD} with --agnostic, --reuse or --questions).")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Fraction of document tokens kept (default 0.25 for compressing methods).")]
BudgetOpt = Annotated[Optional[int], typer.Option("--budget", help="Document tokens kept per KV head, on average (instead of --ratio).")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Ada-KV safeguard floor per head, as a fraction of the mean budget (default 0.2).")]
AgnosticOpt = Annotated[bool, typer.Option("--agnostic", help="Compress before seeing the question (the cache could answer any question).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed when sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (answer, timings, cache statistics) instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
PasswordOpt = Annotated[Optional[str], typer.Option("--password", envvar="KVCLI_PDF_PASSWORD", help="Password of an encrypted PDF: the password, @FILE to read it from a file's first line, or - to be asked on the terminal (neither shows in the process list).")]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", help="Tokens per prefill chunk (bounds activation memory); also the chunk of a document read progressively.")]
ServerOpt = Annotated[Optional[str], typer.Option("--server", envvar="KVCLI_SERVER", help="Go through a running `kvcli serve` (http://HOST:PORT or unix:///path): no model load; the server's model is used.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", envvar="KVCLI_DTYPE", help="Compute precision: auto (CPU with AMX/AVX-512 BF16: read in bfloat16, decode in float32; GPU: bfloat16), or float32, bfloat16, float16 for every phase.")]
MaxContextOpt = Annotated[Optional[int], typer.Option("--max-context", help="Use at most this many positions (default: the model's context); a longer document is read in chunks, compressing after each.")]


def resolve_password(value: str | None) -> str | None:
    """--password as given: the password itself, @FILE (its first line), or - (asked on the terminal)."""
    if value is None or (value != "-" and not value.startswith("@")):
        return value
    if value == "-":
        import getpass

        try:
            return getpass.getpass("PDF password: ")  # the terminal, not stdin (which may be the document)
        except (EOFError, OSError):
            raise KvcliError("--password -: no terminal to ask on; give @FILE or the password") from None
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise KvcliError(f"--password {value}: cannot read {value[1:]}: {exc.strerror}") from None


def _load_document(source: str, password: str | None, reporter: Reporter):
    from kvcli.documents import load_document

    document = load_document(source, password=resolve_password(password))
    for warning in document.warnings:
        reporter.warn(f"{document.name}: {warning}")
    return document


def _print_text(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_questions(question: str | None, questions_file: str | None) -> list[str]:
    if questions_file is None:
        if question is None:
            raise KvcliError("give a QUESTION or --questions FILE")
        return [question]
    if question is not None:
        raise KvcliError("give a QUESTION or --questions FILE, not both")
    try:
        text = sys.stdin.read() if questions_file == "-" else open(questions_file, encoding="utf-8").read()
    except OSError as exc:
        raise KvcliError(f"cannot read questions from {questions_file}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise KvcliError(f"no questions in {questions_file}")
    return lines


def _run_question(
    *, source, question, questions_file=None, model, device, method, ratio, budget, alpha, agnostic, reuse=False,
    kv_dtype="auto", max_new_tokens, temperature, seed, json_out, quiet, password, chunk_size, max_context=None, server=None,
    dtype="auto", cite=False,
) -> None:
    import time

    from kvcli.precision import parse as parse_dtype

    dtype = parse_dtype(dtype)  # before anything slow: a bad value is a one-line error
    from kvcli.store.kvcfile import is_cache_file, read_header  # no torch: a bad file is refused at once

    from_file = is_cache_file(source)
    if from_file and not server:
        read_header(source)  # a bad file fails here, before torch and the model are loaded
    from kvcli import api
    from kvcli.store import persist
    from kvcli.compress.methods import make_press

    reporter = Reporter(quiet)
    generation = api.Generation(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    questions = _read_questions(question, questions_file)
    if method is None:  # the evidence-chosen default for how this cache will be used
        method = default_method(agnostic=agnostic or reuse or len(questions) > 1)
    if server:
        _ask_server(
            server, reporter, source=source, questions=questions, method=method, ratio=ratio, budget=budget, agnostic=agnostic,
            reuse=reuse, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, password=resolve_password(password), json_out=json_out,
            **({"cite": True} if cite else {}),
        )
        return
    press = None if from_file else make_press(method, ratio=ratio, budget=budget, alpha=alpha)
    document = None if from_file else _load_document(source, password, reporter)
    # Answering from a file reads no document: on a CPU that needs no transformers (kvcli.plain).
    loaded = load_model_reporting(model, device, reporter, dtype, plain=from_file)
    started = time.perf_counter()
    precision = loaded.precision.describe()
    if from_file:
        compressed, header = persist.load(loaded, source)  # cast to the decoding precision as it loads
        # How the file was read is not recorded; what it stores is (and it decodes here in precision["decode"]).
        precision.update(read=None, read_autocast=None, stored=header.kv_dtype, why=f"read when {source} was written; {precision['why']}")
        doc_info = header.document.as_dict()
        reporter.note(f"[dim]reusing {source}: {header.document.name}, {header.method.method} at ratio {header.method.ratio}[/]")
    else:
        # api.read and persist read in the model's reading precision (kvcli.precision)
        with reporter.layers(f"Reading {document.name}") as progress:
            if reuse:
                compressed, hit, warning = persist.reuse(
                    loaded, document, press, kv_dtype=kv_dtype, chunk_size=chunk_size, progress=progress, max_context=max_context
                )
                if warning:
                    reporter.warn(warning)
                if hit:  # read by the run that stored it
                    precision.update(read=None, read_autocast=None, why=f"read when {compressed.source} was stored; {precision['why']}")
                reporter.note(f"[dim]{'reused' if hit else 'stored'} compressed cache {compressed.source}[/]")
            else:
                aware = len(questions) == 1 and not agnostic
                compressed = api.read(
                    loaded, document, press, question=questions[0] if aware else None, chunk_size=chunk_size,
                    headroom_tokens=max_new_tokens, progress=progress, max_context=max_context,
                )
        notice = api.progressive_notice(compressed)
        if notice:
            reporter.note(f"[dim]{notice}[/]")
        doc_info = api.document_info(document)
    stream = not json_out and len(questions) == 1
    answers = api.answer(loaded, compressed, questions, generation, on_text=_print_text if stream else None, started=started, cite=cite)
    process_start = process_started()
    for result in answers:
        if json_out:
            record = api.report(loaded, doc_info, compressed, result)
            record["precision"] = precision
            record["timings"]["wall_to_first_token_seconds"] = round(started + result.ttft_seconds - process_start, 4)
            sys.stdout.write(json.dumps(record) + "\n")
        elif stream:
            sys.stdout.write(_cited(result.citations, " ") + "\n")
        else:
            sys.stdout.write(f"Q: {result.question}\n{result.answer}{_cited(result.citations, ' ')}\n\n")
    sys.stdout.flush()
    stats = compressed.stats()
    last = answers[-1]
    prefill_s = f"prefill {compressed.prefill.prefill_seconds:.2f} s, " if compressed.prefill else ""
    reporter.note(
        f"[dim]{stats['document_tokens']} document tokens, kept {stats['kept_fraction']:.0%} ({compressed.press.name}); "
        f"{prefill_s}first token {last.ttft_seconds:.2f} s ({started + last.ttft_seconds - process_start:.2f} s after start), "
        f"{last.decode_tokens_per_second:.1f} tokens/s[/]"
    )


def _cited(citations, before: str = "") -> str:
    """What text output appends to an answer: " (p. 3, p. 7)" with --cite, else nothing."""
    from kvcli.citations import format_pages

    return "" if citations is None else before + format_pages(citations)


def _ask_server(url: str, reporter: Reporter, **request) -> None:
    """`ask --server`: the server answers (with --reuse, from the cache its manager keeps)."""
    from kvcli.serve.client import remote_ask

    result = remote_ask(url, **request, process_start=process_started())
    sys.stdout.flush()
    placement, first = result["placement"], result["answers"][0]["timings"]
    held = f" ({placement['config']})" if "config" in placement else ""
    reporter.note(f"[dim]served by {url} from {placement['served_from']}{held}; first token {first['ttft_seconds']:.2f} s[/]")


# ---- commands -------------------------------------------------------------------------


KvDtypeOpt = Annotated[str, typer.Option("--kv-dtype", help="Stored K/V precision: auto, bf16, fp16, fp32, int8, int4 (int8/int4 are lossy).")]


@app.command()
def ask(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, - for stdin, or a .kvc cache from `kvcli compress`.")],
    question: Annotated[Optional[str], typer.Argument(help="The question (or use --questions).")] = None,
    *,
    questions: Annotated[Optional[str], typer.Option("--questions", help="A file of questions, one per line (- for stdin); answered as one batch over one agnostic cache.")] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    alpha: AlphaOpt = None,
    agnostic: AgnosticOpt = False,
    reuse: Annotated[bool, typer.Option("--reuse", help="Compress question-agnostically once, keep it in the cache store, reuse it next time (with --server: the server's managed caches).")] = False,
    kv_dtype: KvDtypeOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    password: PasswordOpt = None,
    chunk_size: ChunkOpt = 2048,
    max_context: MaxContextOpt = None,
    server: ServerOpt = None,
    cite: Annotated[bool, typer.Option("--cite", help="Cite the pages the answer drew on (from its attention to the kept document tokens): text ends with (p. 3, p. 7); --json adds citations with snippets.")] = False,
) -> None:
    """Answer a question about a document (or a saved .kvc cache)."""
    guard(lambda: _run_question(
        source=document, question=question, questions_file=questions, model=model, device=device, method=method,
        ratio=ratio, budget=budget, alpha=alpha, agnostic=agnostic, reuse=reuse, kv_dtype=kv_dtype, dtype=dtype,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, json_out=json_out, quiet=quiet,
        password=password, chunk_size=chunk_size, max_context=max_context, server=server, cite=cite,
    ))


@app.command()
def summarize(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, - for stdin, or a .kvc cache.")],
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: MethodOpt = None,
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
    max_context: MaxContextOpt = None,
    server: ServerOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Summarize a document (compression is question-agnostic: there is no question)."""
    from kvcli.prompts import SUMMARY_INSTRUCTION

    guard(lambda: _run_question(
        source=document, question=SUMMARY_INSTRUCTION, model=model, device=device, method=method, ratio=ratio,
        budget=budget, alpha=alpha, agnostic=True, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        json_out=json_out, quiet=quiet, password=password, chunk_size=chunk_size, max_context=max_context, server=server,
        dtype=dtype,
    ))


@app.command()
def compress(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, or - for stdin.")],
    *,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write the .kvc cache (with --server and no -o: the server keeps it in its managed caches).")] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: Annotated[str, typer.Option("--method", envvar="KVCLI_METHOD", help=f"Compression method: {', '.join(METHODS)}.")] = DEFAULT_AGNOSTIC_METHOD,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    alpha: AlphaOpt = None,
    kv_dtype: KvDtypeOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    password: PasswordOpt = None,
    chunk_size: ChunkOpt = 2048,
    max_context: MaxContextOpt = None,
    server: ServerOpt = None,
) -> None:
    """Compress a document question-agnostically and save the cache for any later question."""

    def run():
        from kvcli.precision import parse as parse_dtype

        requested = parse_dtype(dtype)
        from kvcli import api
        from kvcli.store import persist
        from kvcli.compress.methods import make_press

        if output is None and not server:
            raise KvcliError("give --output FILE.kvc (or --server URL to add the document to the server's managed caches)")
        if output is not None and not output.endswith(".kvc"):
            raise KvcliError(f"--output must end in .kvc (got {output})")
        reporter = Reporter(quiet)
        if server:
            _compress_server(server, reporter, source=document, output=output, method=method, ratio=ratio, budget=budget,
                             kv_dtype=kv_dtype, password=resolve_password(password), json_out=json_out)
            return
        press = make_press(method, ratio=ratio, budget=budget, alpha=alpha)
        doc = _load_document(document, password, reporter)
        loaded = load_model_reporting(model, device, reporter, requested)
        with reporter.layers(f"Compressing {doc.name}") as progress:
            compressed, written = persist.compress(  # kv auto: stored in the dtype it was read into
                loaded, doc, press, output, kv_dtype=kv_dtype, chunk_size=chunk_size, progress=progress, max_context=max_context
            )
        notice = api.progressive_notice(compressed)
        if notice:
            reporter.note(f"[dim]{notice}[/]")
        stats = compressed.stats()
        if json_out:
            record = {"output": output, "bytes": written, "document": api.document_info(doc), "cache": stats}
            record["precision"] = {key: value for key, value in loaded.precision.describe().items() if key != "decode"}
            sys.stdout.write(json.dumps(record) + "\n")
        reporter.note(
            f"wrote {output}: {written / 1e6:.1f} MB, {stats['document_tokens']} document tokens, kept {stats['kept_fraction']:.0%} "
            f"({press.name}, kv {kv_dtype}); compression {stats['compression_seconds']:.2f} s"
        )

    guard(run)


def _compress_server(url: str, reporter: Reporter, *, json_out: bool, **request) -> None:
    from kvcli.serve.client import remote_compress

    result = remote_compress(url, **request)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
    elif "entry" in result:
        row = result["entry"]
        reporter.note(f"added {row['document']} ({row['id'][:12]}): {row['config']} on {row['tier']}, {row['bytes'] / 1e6:.1f} MB")
    else:
        reporter.note(f"wrote {result['output']}: {result['bytes'] / 1e6:.1f} MB (by {url})")


@app.command()
def info(
    cache_file: Annotated[Optional[str], typer.Argument(help="A .kvc file to describe (else: the model).")] = None,
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    kept_map: Annotated[Optional[str], typer.Option("--map", help="With a .kvc file: draw what was kept into FILE.png (pages against layers, and each head's budget).")] = None,
) -> None:
    """Show the model, device, dtype, context length and library versions, or describe a .kvc file."""

    def run():
        from kvcli.cli.info import cache_file_info, model_info, show, write_kept_map
        from kvcli.precision import parse as parse_dtype

        requested = parse_dtype(dtype)
        if kept_map is not None and cache_file is None:
            raise KvcliError("--map draws a .kvc file: give the file (kvcli info FILE.kvc --map kept.png)")
        if cache_file is not None:
            details = cache_file_info(cache_file)
            if kept_map is not None:
                details["map"] = write_kept_map(cache_file, kept_map)
        else:
            loaded = load_model_reporting(model, device, Reporter(quiet), requested)
            details = model_info(loaded)
            phases = loaded.precision
            details["precision"] = phases.describe() if json_out else f"read {phases.read}, decode {phases.decode} ({phases.why})"
        if json_out:
            sys.stdout.write(json.dumps(details) + "\n")
            return
        width = max(len(k) for k in details)
        for key, value in details.items():
            sys.stdout.write(f"{key:<{width}}  {show(value)}\n")

    guard(run)


@cache_app.command("list")
def cache_list(json_out: JsonOpt = False, server: ServerOpt = None) -> None:
    """List the stored compressed caches (with --server: tier, configuration, size, utility and why)."""

    def run():
        from kvcli.store.persist import store_entries

        if server:
            _list_server(server, json_out)
            return

        entries = store_entries()
        if json_out:
            for entry in entries:
                sys.stdout.write(json.dumps(entry) + "\n")
            return
        for e in entries:
            if "error" in e:
                sys.stdout.write(f"{e['id'][:12]}  unreadable: {e['error']}\n")
            else:
                sys.stdout.write(f"{e['id'][:12]}  {e['bytes'] / 1e6:8.1f} MB  {e['method']}@{e['ratio']}  {e['kv_dtype']}  {e['document']}  ({e['model']})\n")

    guard(run)


def _list_server(url: str, json_out: bool) -> None:
    from kvcli.serve.client import CACHE_HEADER, Client, format_cache_row

    rows = Client(url).caches()["caches"]
    if json_out:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    sys.stdout.write(CACHE_HEADER + "\n")
    for row in rows:
        sys.stdout.write(format_cache_row(row) + "\n")
        if row.get("reason"):
            sys.stdout.write(f"    why: {row['reason']}\n")


@cache_app.command("rm")
def cache_rm(
    cache_id: Annotated[str, typer.Argument(help="Id (or unique prefix) from `kvcli cache list`.")], server: ServerOpt = None
) -> None:
    """Remove one stored cache."""

    def run():
        from kvcli.serve.client import Client
        from kvcli.store.persist import store_remove

        for removed in Client(server).remove(cache_id) if server else store_remove(cache_id):
            sys.stdout.write(f"removed {removed}\n")

    guard(run)


@cache_app.command("clear")
def cache_clear(server: ServerOpt = None) -> None:
    """Remove every stored cache (with --server: every cache the server manages)."""

    def run():
        from kvcli.serve.client import Client
        from kvcli.store.persist import store_clear

        count = len(Client(server).clear()) if server else store_clear()
        sys.stdout.write(f"removed {count} cache(s)\n")

    guard(run)


@app.command()
def chat(
    document: Annotated[str, typer.Argument(help="A .pdf, .txt or .md file, or a .kvc cache (not -: the questions come from the terminal).")],
    *,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    method: Annotated[Optional[str], typer.Option("--method", envvar="KVCLI_METHOD", help=f"Compression method: {', '.join(METHODS)} (default {DEFAULT_AGNOSTIC_METHOD}: the chat compresses before any question).")] = None,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    alpha: AlphaOpt = None,
    dtype: DtypeOpt = "auto",
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    password: PasswordOpt = None,
    chunk_size: ChunkOpt = 2048,
    max_context: MaxContextOpt = None,
    server: ServerOpt = None,
    timings: Annotated[bool, typer.Option("--timings", help="On leaving, print on stderr when the chat was ready and each question's time to first token.")] = False,
    cite: Annotated[bool, typer.Option("--cite", help="Start with /cite on: each answer ends with the pages it drew on, (p. 3, p. 7).")] = False,
) -> None:
    """Read and compress a document once, then answer question after question (/help inside)."""
    guard(lambda: chat_cli.run(
        document, model=model, device=device, dtype=dtype, method=method, ratio=ratio, budget=budget, alpha=alpha,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, quiet=quiet,
        password=resolve_password(password), chunk_size=chunk_size, max_context=max_context, server=server, timings=timings,
        cite=cite,
    ))


serve_cli.register(app)
eval_cli.register(app)


def _quiet_libraries() -> None:
    """transformers' progress bars and advice would pollute stderr; we report our own.

    Through the environment, which transformers and huggingface_hub read when (and only if)
    a command imports them: importing transformers here would cost `--help` a second.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    _quiet_libraries()
    app(prog_name="kvcli")


if __name__ == "__main__":
    main()
