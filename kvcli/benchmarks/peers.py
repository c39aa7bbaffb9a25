"""kvcli beside llama.cpp (llama-cpp-python) on this CPU: the same GGUF file, the same tokens.

For each model and document, in one run, each engine in its own fresh processes (so each
one's peak RSS is its own, read from the kernel's accounting of that child by os.wait4):

  first      read the document, answer one question: time to first token (from the start
             of reading), decode tokens/s, peak RSS. llama.cpp saves its state after the
             document (llama_state_save_file: its KV cache + the tokens) before the question;
             kvcli answers as `kvcli ask DOC Q` does (question-aware, its default method and
             ratio) and writes its `.kvc` as `kvcli compress DOC -o FILE` does (agnostic).
  follow-up  a new process answers another question from the saved file (llama.cpp's
             state file, our `.kvc`): time to first token from the file and from the process
             start, both files' sizes.
  agreement  every sample question of the document answered from the saved file by both:
             do the answers agree with each other, and contain the expected answer?

Both engines see the same tokens: the document is read by kvcli's reader and laid out by
kvcli's prompt layout ([prefix][document][question part], the chat template of the GGUF);
llama.cpp is given those token ids, not text. llama.cpp runs as its users would set it
up: --threads (default: the cores; its batch too), flash attention on, its default 512-token
batch, KV cache f16 (its default) and q8_0, its default weight buffers unless they crash
(see extra_buffers_work); kvcli runs with its defaults (ratio 0.25, dtype auto), its torch
on the same thread count.

Models: the embedded GGUF (SmolLM2-135M-Instruct Q4_1), and `random-1b`: Llama-3.2-1B's
shapes (16 layers, hidden 2048, 32 query / 8 KV heads of 64, FFN 8192, tied embeddings)
with random q8_0 weights and SmolLM2's tokenizer (so both engines can tokenize; its
vocabulary is 49,152, not Llama 3's 128,256), written with the `gguf` writer and cached
under /tmp: for speed and memory only, its answers mean nothing.

A document longer than the model's context (long_manual.txt, ~25K tokens against 8,192)
is read by kvcli progressively within the context; llama.cpp is given a context that holds
the whole prompt, past the length it was trained for, so its speed and memory compare but
its answers there are not a fair quality test.

    python -m kvcli.benchmarks.peers --out peers.json
    python -m kvcli.benchmarks.peers --models embedded --documents annual_report.pdf --repeats 1   # quick

Needs `pip install 'kvcli[llamacpp]'`. Each figure is the median over --repeats rounds,
peak RSS the largest; rounds alternate the engines so a shared machine's load falls on
both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
RANDOM_GGUF_DIR = Path(tempfile.gettempdir()) / "kvcli-peers"
# Llama-3.2-1B (HF config): what the random model takes its shapes from.
LLAMA_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 8192, "rope_theta": 500000.0, "context": 8192}
KV_TYPES = ("f16", "q8_0")
CONTEXT_MARGIN = 8  # tokens of slack past prompt + answer in llama.cpp's context


# ---- the random Llama-shaped GGUF ------------------------------------------------------


def write_random_llama_gguf(path: Path, tokenizer_gguf: Path, shapes: dict = LLAMA_1B, *, seed: int = 0, quant: str = "q8_0") -> Path:
    """A Llama-architecture GGUF with `shapes` and random weights (normal, std 0.02; norms 1),
    carrying the tokenizer of `tokenizer_gguf` (every `tokenizer.*` key). Written to a temp
    name and renamed, so a killed run leaves no half file at `path`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    source = GGUFReader(tokenizer_gguf)
    tokens = source.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    hidden, heads, kv_heads = shapes["hidden"], shapes["heads"], shapes["kv_heads"]
    head_dim = hidden // heads
    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(partial, "llama")
    writer.add_name("random-llama")
    writer.add_context_length(shapes["context"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(shapes["layers"])
    writer.add_feed_forward_length(shapes["ffn"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shapes["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(7 if quant == "q8_0" else 1)  # LLAMA_FTYPE_MOSTLY_Q8_0 / MOSTLY_F16
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            _copy_field(writer, name, field, GGUFValueType)
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType.Q8_0 if quant == "q8_0" else GGMLQuantizationType.F16

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)  # tied: no output.weight, as in Llama-3.2-1B
    norm("output_norm.weight")
    for i in range(shapes["layers"]):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", shapes["ffn"], hidden)
        matrix(f"blk.{i}.ffn_up.weight", shapes["ffn"], hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, shapes["ffn"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return path


def _copy_field(writer, name: str, field, value_types) -> None:
    """One key/value of a GGUFReader into a GGUFWriter, keeping its GGUF type."""
    kind = field.types[0]
    if kind == value_types.ARRAY:
        item = field.types[1]
        if item == value_types.STRING:
            values = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            values = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_key_value(name, values, value_types.ARRAY, sub_type=item)
    elif kind == value_types.STRING:
        writer.add_key_value(name, bytes(field.parts[field.data[0]]).decode("utf-8"), kind)
    else:
        writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)


def random_model(tokenizer_gguf: Path) -> Path:
    path = RANDOM_GGUF_DIR / "random-llama-1b-shapes.q8_0.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_llama_gguf(path, tokenizer_gguf)
    return path


# ---- answers --------------------------------------------------------------------------


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w$.,&%-]+", " ", text.lower()).split()).strip(" .,")


def contains_expected(answer: str, expected: list[str]) -> bool:
    return any(normalized(e) in normalized(answer) for e in expected)


def agree(a: str, b: str) -> bool:
    """The same answer, case, spacing and punctuation aside."""
    return normalized(a) == normalized(b)


def sample_questions(document: str) -> list[dict]:
    with open(SAMPLES / "questions.jsonl", encoding="utf-8") as f:
        return [q for q in map(json.loads, f) if q["document"] == document]


# ---- the llama.cpp worker (its own process: imports llama_cpp and numpy, never torch) ----


def llama_worker(spec: dict) -> dict:
    """Runs in a child process: load the GGUF, then either read the document and answer
    (saving the state after the document), or load the saved state and answer each question."""
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as bindings
    import numpy as np

    if not spec["extra_buffers"]:
        # llama.cpp's `--no-repack`: no AMX / repacked weight buffers (see extra_buffers_work).
        defaults = bindings.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = without_extra_buffers
    started = time.perf_counter()
    threads = spec["threads"]
    kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[spec["kv_type"]]
    llm = llama_cpp.Llama(
        model_path=spec["model"], n_ctx=spec["n_ctx"], n_threads=threads, n_threads_batch=threads,
        flash_attn=True, type_k=kv_type, type_v=kv_type, verbose=False,
    )
    ctx = llm.ctx
    stop = {llm.token_eos()}
    loaded = time.perf_counter()

    def answer(question_ids: list[int], t0: float) -> dict:
        llm.eval(question_ids)
        tokens, first_at = [], None
        while len(tokens) < spec["max_new_tokens"]:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),))
            token = int(logits.argmax())
            if first_at is None:
                first_at = time.perf_counter()
            if token in stop:
                break
            tokens.append(token)
            llm.eval([token])
        done = time.perf_counter()
        return {
            "ttft_seconds": first_at - t0,
            "first_token_epoch": time.time() - (time.perf_counter() - first_at),  # the parent knows when it spawned us
            "decode_tokens_per_second": (len(tokens) - 1) / (done - first_at) if len(tokens) > 1 and done > first_at else 0.0,
            "new_tokens": len(tokens),
            "answer": llm.detokenize(tokens).decode("utf-8", errors="replace").strip(),
        }

    result = {"load_seconds": loaded - started}
    state = spec["state_file"].encode()
    if spec["phase"] == "probe":
        llm.eval(spec["context_ids"])
        return result
    if spec["phase"] == "first":
        t0 = time.perf_counter()
        llm.eval(spec["context_ids"])
        read = time.perf_counter()
        # The state after the document: what a follow-up question in another process starts from.
        ids = (llama_cpp.llama_token * len(spec["context_ids"]))(*spec["context_ids"])
        if not llama_cpp.llama_state_save_file(ctx, state, ids, len(spec["context_ids"])):
            raise RuntimeError("llama_state_save_file failed")
        saved = time.perf_counter()
        result.update(answer(spec["questions"][0], t0 + (saved - read)))  # the save is not part of the wait
        result.update(read_seconds=read - t0, save_seconds=saved - read, state_bytes=os.path.getsize(spec["state_file"]))
    else:
        answers = []
        for question_ids in spec["questions"]:
            t0 = time.perf_counter()
            capacity = spec["n_ctx"]
            out = (llama_cpp.llama_token * capacity)()
            count = ctypes.c_size_t(0)
            if not llama_cpp.llama_state_load_file(ctx, state, out, capacity, ctypes.byref(count)):
                raise RuntimeError("llama_state_load_file failed")
            llm.n_tokens = count.value  # llama-cpp-python's own bookkeeping of what the KV holds
            llm.input_ids[: count.value] = list(out[: count.value])
            answers.append(answer(question_ids, t0))
        result.update(answers[0], answers=[a["answer"] for a in answers])
    return result


# ---- running the engines in fresh processes -------------------------------------------


def extra_buffers_work(model: Path, threads: int, env: dict, workdir: Path) -> bool:
    """Whether llama.cpp survives its default weight buffers on this CPU. On this machine's
    CPU (AMX advertised and enabled) llama-cpp-python 0.3.36 dies of SIGILL at `tilezero` in
    ggml_backend_amx_mul_mat for Q4_1 and Q8_0 weights; without the extra buffer types (AMX,
    repacking: llama.cpp's --no-repack) it runs. Probed on a few tokens in a child."""
    spec = {"model": str(model), "threads": threads, "kv_type": "f16", "n_ctx": 64, "state_file": "", "phase": "probe",
            "context_ids": [1, 2, 3, 4], "extra_buffers": True}
    try:
        llama_child(spec, env, workdir)
        return True
    except RuntimeError as e:
        if "exited -4" in str(e):  # SIGILL
            return False
        raise


def run_child(argv: list[str], env: dict) -> tuple[dict | list, float]:
    """Run one child to completion; its stdout's JSON, and its own peak RSS in MiB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])}... exited {process.returncode}: {err.read()[-2000:]}")
        lines = [json.loads(line) for line in out.read().splitlines() if line.strip().startswith(("{", "["))]
    return (lines[0] if len(lines) == 1 else lines), usage.ru_maxrss / 1024  # Linux: KiB


def llama_child(spec: dict, env: dict, workdir: Path) -> dict:
    spec_file = workdir / "llama-spec.json"
    spec_file.write_text(json.dumps(spec))
    spawned, spawned_epoch = time.perf_counter(), time.time()
    result, rss = run_child([sys.executable, "-m", "kvcli.benchmarks.peers", "--llama-worker", str(spec_file)], env)
    wall = result.pop("first_token_epoch") - spawned_epoch
    return {**result, "wall_to_first_token_seconds": wall, "peak_rss_mib": rss, "process_seconds": time.perf_counter() - spawned}


def kvcli_child(args: list[str], env: dict) -> tuple[dict | list, float, float]:
    spawned = time.perf_counter()
    result, rss = run_child([sys.executable, "-m", "kvcli.cli.main", *args], env)
    return result, rss, time.perf_counter() - spawned


def kvcli_record(record: dict, rss: float, seconds: float) -> dict:
    timings = record["timings"]
    return {
        "ttft_seconds": timings["ttft_seconds"],
        "wall_to_first_token_seconds": timings.get("wall_to_first_token_seconds"),
        "decode_tokens_per_second": timings["decode_tokens_per_second"],
        "new_tokens": timings["new_tokens"],
        "load_seconds": timings["model_load_seconds"],
        "answer": record["answer"],
        "kept_fraction": record["cache"].get("kept_fraction"),
        "method": record["cache"].get("method"),
        "peak_rss_mib": rss,
        "process_seconds": seconds,
    }


def one_round(model: Path, document: Path, layout: dict, questions: list[dict], args, env: dict, workdir: Path) -> dict:
    """Every engine once on one (model, document): first question, follow-up, agreement."""
    first, follow = questions[0]["question"], questions[1]["question"]
    prompt_len = len(layout["context_ids"]) + max(len(q) for q in layout["question_ids"])
    n_ctx = prompt_len + args.max_new_tokens + CONTEXT_MARGIN
    rows = {}
    for kv_type in args.kv_types:
        state_file = str(workdir / f"state-{kv_type}.bin")
        base = {"model": str(model), "threads": args.threads, "kv_type": kv_type, "n_ctx": n_ctx, "state_file": state_file,
                "max_new_tokens": args.max_new_tokens, "extra_buffers": args.extra_buffers}
        rows[f"llama.cpp kv {kv_type} first"] = llama_child(
            {**base, "phase": "first", "context_ids": layout["context_ids"], "questions": [layout["question_ids"][0]]}, env, workdir
        )
        rows[f"llama.cpp kv {kv_type} follow-up"] = llama_child(
            {**base, "phase": "follow-up", "questions": [layout["question_ids"][1]]}, env, workdir
        )
        rows[f"llama.cpp kv {kv_type} follow-up"]["state_bytes"] = os.path.getsize(state_file)
    common = ["--model", str(model), "--max-new-tokens", str(args.max_new_tokens), "--json", "--quiet"]
    record, rss, seconds = kvcli_child(["ask", str(document), first, *common], env)
    rows["kvcli first"] = kvcli_record(record, rss, seconds)
    kvc = workdir / "doc.kvc"
    compress_args = ["compress", str(document), "-o", str(kvc), "--model", str(model), "--quiet"]
    _, rss, seconds = kvcli_child(compress_args, env)
    rows["kvcli compress"] = {"peak_rss_mib": rss, "process_seconds": seconds, "kvc_bytes": kvc.stat().st_size}
    record, rss, seconds = kvcli_child(["ask", str(kvc), follow, *common], env)
    rows["kvcli follow-up"] = {**kvcli_record(record, rss, seconds), "kvc_bytes": kvc.stat().st_size}
    return rows


def agreement(model: Path, layout: dict, questions: list[dict], args, env: dict, workdir: Path) -> dict:
    """Every question answered from each engine's saved file (the files of the last round)."""
    n_ctx = len(layout["context_ids"]) + max(len(q) for q in layout["question_ids"]) + args.max_new_tokens + CONTEXT_MARGIN
    answers = {}
    for kv_type in args.kv_types:
        spec = {"model": str(model), "threads": args.threads, "kv_type": kv_type, "n_ctx": n_ctx, "phase": "follow-up",
                "state_file": str(workdir / f"state-{kv_type}.bin"), "max_new_tokens": args.max_new_tokens,
                "questions": layout["question_ids"], "extra_buffers": args.extra_buffers}
        answers[f"llama.cpp kv {kv_type}"] = llama_child(spec, env, workdir)["answers"]
    qfile = workdir / "questions.txt"
    qfile.write_text("".join(q["question"] + "\n" for q in questions))
    records, _, _ = kvcli_child(
        ["ask", str(workdir / "doc.kvc"), "--questions", str(qfile), "--model", str(model),
         "--max-new-tokens", str(args.max_new_tokens), "--json", "--quiet"], env
    )
    answers["kvcli .kvc"] = [r["answer"] for r in (records if isinstance(records, list) else [records])]
    summary = {}
    for engine, texts in answers.items():
        summary[engine] = {
            "expected_found": sum(contains_expected(t, q["answers"]) for t, q in zip(texts, questions)),
            "agrees_with_llama": sum(agree(t, o) for t, o in zip(texts, answers[f"llama.cpp kv {args.kv_types[0]}"])),
            "questions": len(questions),
        }
    return {"summary": summary, "answers": answers}


def layout_for(document: Path, questions: list[dict]) -> dict:
    """The token ids both engines are given: kvcli's reader and prompt layout."""
    from kvcli.documents import load_document
    from kvcli.models import load_model
    from kvcli.prompts import PromptLayout

    tokenizer = load_model().tokenizer  # the random model carries the embedded one's tokenizer
    text = load_document(str(document)).text
    built = PromptLayout.build(tokenizer, text, None)
    return {
        "context_ids": built.prefix_ids + built.document_ids,
        "document_tokens": len(built.document_ids),
        "question_ids": [built.question_part(q["question"]) for q in questions],
    }


def head_of(document: Path, chars: int, workdir: Path) -> Path:
    """The first `chars` characters of the document's text (as kvcli reads it), as a .txt."""
    from kvcli.documents import load_document

    path = workdir / f"{document.stem}-first-{chars}.txt"
    path.write_text(load_document(str(document)).text[:chars], encoding="utf-8")
    return path


def summarize_rounds(rounds: list[dict]) -> dict:
    """Median of each timing over the rounds, the largest peak RSS; the last round's answers."""
    table = {}
    for name in rounds[0]:
        row = dict(rounds[-1][name])
        for key in ("ttft_seconds", "wall_to_first_token_seconds", "decode_tokens_per_second", "load_seconds", "read_seconds",
                    "save_seconds", "process_seconds"):
            values = [r[name][key] for r in rounds if r[name].get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        row["peak_rss_mib"] = max(r[name]["peak_rss_mib"] for r in rounds)
        row["runs"] = len(rounds)
        table[name] = row
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,random-1b", help="embedded, random-1b or .gguf paths, comma-separated")
    parser.add_argument("--documents", default="annual_report.pdf,long_manual.txt")
    parser.add_argument("--random-documents", default="annual_report.pdf", help="documents for random-1b (speed and memory only)")
    parser.add_argument("--random-chars", type=int, default=4000,
                        help="random-1b reads only this many characters of each document's text (0: all; two cores read 1B slowly)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="both engines (default: the cores)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kv-types", default=",".join(KV_TYPES), help="llama.cpp's KV cache types, comma-separated")
    parser.add_argument("--no-agreement", action="store_true", help="skip answering every sample question")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.kv_types = args.kv_types.split(",")
    if args.llama_worker:
        sys.stdout.write(json.dumps(llama_worker(json.loads(Path(args.llama_worker).read_text()))) + "\n")
        return

    from kvcli.models import embedded_gguf

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "KVCLI_DTYPE": ""}
    results = {"machine": _machine(), "threads": args.threads, "max_new_tokens": args.max_new_tokens, "runs": []}
    for spec in args.models.split(","):
        model = embedded_gguf() if spec == "embedded" else random_model(embedded_gguf()) if spec == "random-1b" else Path(spec)
        documents = args.random_documents if spec == "random-1b" else args.documents
        for name in documents.split(","):
            questions = sample_questions(name)
            load_before = os.getloadavg()
            with tempfile.TemporaryDirectory(prefix="kvcli-peers-") as tmp:
                document = SAMPLES / name
                if spec == "random-1b" and args.random_chars:
                    document = head_of(document, args.random_chars, Path(tmp))
                layout = layout_for(document, questions)
                # kvcli converts a GGUF once and caches the result: done here, not inside a measured process.
                _, _, convert_seconds = kvcli_child(["info", "--model", str(model), "--json"], env)
                args.extra_buffers = extra_buffers_work(model, args.threads, env, Path(tmp))
                rounds = [one_round(model, document, layout, questions, args, env, Path(tmp)) for _ in range(args.repeats)]
                entry = {"model": spec, "gguf": str(model), "document": document.name, "document_tokens": layout["document_tokens"],
                         "llama_extra_buffers": args.extra_buffers, "kv_types": args.kv_types, "kvcli_convert_or_load_seconds": convert_seconds, "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": summarize_rounds(rounds),
                         "first_question": questions[0]["question"], "follow_up_question": questions[1]["question"]}
                if spec != "random-1b" and not args.no_agreement:
                    entry["agreement"] = agreement(model, layout, questions, args, env, Path(tmp))
            results["runs"].append(entry)
            sys.stderr.write(format_entry(entry) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def format_entry(entry: dict) -> str:
    lines = [f"== {entry['model']} on {entry['document']} ({entry['document_tokens']} document tokens), "
             f"load {entry['load_average_before'][0]:.2f} -> {entry['load_average_after'][0]:.2f}"]
    lines.append(f"{'row':28} {'TTFT s':>8} {'wall->1st s':>11} {'tok/s':>7} {'peak RSS MiB':>12} {'file MB':>8}  answer")
    for name, row in entry["rows"].items():
        size = row.get("state_bytes") or row.get("kvc_bytes")
        lines.append(
            f"{name:28} {_fmt(row.get('ttft_seconds'), 8, 3)} {_fmt(row.get('wall_to_first_token_seconds'), 11, 2)} "
            f"{_fmt(row.get('decode_tokens_per_second'), 7, 1)} {row['peak_rss_mib']:12.0f} {_fmt(size and size / 1e6, 8, 1)}  "
            f"{(row.get('answer') or '')[:40]!r}"
        )
    for engine, s in entry.get("agreement", {}).get("summary", {}).items():
        lines.append(f"  {engine:24} expected found {s['expected_found']}/{s['questions']}, "
                     f"same as llama.cpp kv {entry['kv_types'][0]} {s['agrees_with_llama']}/{s['questions']}")
    return "\n".join(lines)


def _fmt(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else " " * (width - 1) + "-"


def _machine() -> dict:
    model_name = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    main()
