"""End-to-end speed and memory on a Llama-3.1-8B-shaped model with random bf16 weights.

Speed does not depend on weight values, so random weights on the real shapes measure what
a user of an 8B model gets. All rows come from one run, so ratios between them are fair:

  - plain transformers (its SDPA path, and the flash backend forced), full DynamicCache;
  - kvcli at kept ratios 1.0 / 0.2 / 0.1 (ada-snapkv, question-aware, layer-by-layer
    prefill, decode over the compressed cache: eager, and CUDA-graph replay of transformers'
    layers and of the fused step of kvcli.fastpath);
  - the bandwidth floor of one decode step: (weight bytes + kept K/V bytes) / copy bandwidth;
  - time to first token reusing a saved .kvc vs reading the document again (--reuse-length),
    the first load of a fresh process in a child process;
  - what the first call of a fresh process pays for Triton compilation, with an empty and
    a filled on-disk kernel cache (--skip-compile-cost to leave it out).

    python -m kvcli.benchmarks.e2e --lengths 8192,32768,131072 --ratios 1.0,0.2,0.1 --out e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

QUESTION_TOKENS = 32
DECODE_STEPS = 64


def llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )


def build_model():
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_8b_config()).eval()
    torch.set_default_dtype(torch.float32)
    return model


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (time.perf_counter() - start)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def baseline(model, ids: torch.Tensor, backend: str) -> dict:
    """Plain transformers: full prefill into a DynamicCache, then token-by-token decode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.set_attn_implementation("sdpa")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    context = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if backend == "flash" else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), context:
        out, prefill_s = timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
        peak = torch.cuda.max_memory_allocated()
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            step = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _, decode_s = timed(lambda: [model(token, past_key_values=cache, use_cache=True, logits_to_keep=1) for _ in range(DECODE_STEPS)])
    del out, cache, step
    torch.cuda.empty_cache()
    from kvcli.attention import install

    install(model)
    return {"prefill_s": prefill_s, "ttft_s": prefill_s, "decode_ms": 1000 * decode_s / DECODE_STEPS, "peak_gib": peak / 2**30}


class ByteTokenizer:
    """Stands in for a real tokenizer: KVzip's reconstruction prompt needs text encoded."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def layout_for(ids: list[int], question: bool):
    from kvcli.prompts import ChatTemplate, PromptLayout

    doc, q = (ids[:-QUESTION_TOKENS], ids[-QUESTION_TOKENS:]) if question else (ids, [])
    template = ChatTemplate(prefix="", middle="\n", suffix="\n")
    return PromptLayout(tokenizer=ByteTokenizer(), template=template, prefix_ids=[], document_ids=doc, question_ids=q)


def ours(model, ids: list[int], ratio: float, chunk_size: int, weight_bytes: int, bandwidth: float) -> dict:
    from kvcli.generate import GraphedStep, forward
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill

    press = make_press("full") if ratio >= 1.0 else make_press("ada-snapkv", ratio=ratio)
    # Warm this configuration's kernels first (Triton compiles per configuration, not per
    # length): the timed prefill is then the same work a second document costs.
    _, warmup_s = timed(lambda: prefill(model, layout_for(ids[:4096], True), press, chunk_size=chunk_size))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result, prefill_s = timed(lambda: prefill(model, layout_for(ids, True), press, chunk_size=chunk_size, headroom=DECODE_STEPS * 3))
    peak = torch.cuda.max_memory_allocated()
    cache = result.cache
    kv_bytes = cache.nbytes()
    token = result.last_logits.argmax().view(1, 1)
    for _ in range(2):
        forward(model, cache, token)
    _, eager_s = timed(lambda: [forward(model, cache, token) for _ in range(DECODE_STEPS // 4)])
    graph_ms = {}
    for fused in (False, True):  # transformers' layers vs kvcli.fastpath, both graph-replayed
        step, capture_s = timed(lambda: GraphedStep(model, cache, DECODE_STEPS + 8, fused=fused))
        step(token)
        _, graph_s = timed(lambda: [step(token) for _ in range(DECODE_STEPS)])
        graph_ms[fused] = 1000 * graph_s / DECODE_STEPS
        del step
    floor_ms = 1000 * (weight_bytes + kv_bytes) / bandwidth
    decode_ms = graph_ms[True]
    row = {
        "warmup_4k_s": warmup_s,
        "prefill_s": prefill_s,
        "compression_s": result.compression_seconds,
        "ttft_s": prefill_s,
        "decode_ms_eager": 1000 * eager_s / (DECODE_STEPS // 4),
        "decode_ms": decode_ms,
        "decode_ms_unfused": graph_ms[False],
        "graph_capture_s": capture_s,
        "floor_ms": floor_ms,
        "decode_over_floor": decode_ms / floor_ms,
        "peak_gib": peak / 2**30,
        "kv_gib": kv_bytes / 2**30,
        "full_kv_gib": result.full_bytes / 2**30,
    }
    del result, cache
    torch.cuda.empty_cache()
    return row


def reuse(model, ids: list[int], ratio: float, chunk_size: int) -> dict:
    """TTFT: load a saved agnostic cache + prefill the question vs read document + question."""
    from kvcli.store.kvcfile import load_cache, save_cache
    from kvcli.generate import forward
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill

    question = torch.tensor([ids[-QUESTION_TOKENS:]], device="cuda")
    prefill(model, layout_for(ids[:2048], True), make_press("ada-snapkv", ratio=ratio), chunk_size=chunk_size)  # warm-up
    reread, reread_s = timed(lambda: prefill(model, layout_for(ids, True), make_press("ada-snapkv", ratio=ratio), chunk_size=chunk_size))
    forward(model, reread.cache, question[:, :1])  # Triton kernels compiled before any timing below
    del reread
    document = layout_for(ids[:-QUESTION_TOKENS], False)
    prefill(model, layout_for(ids[:4096], False), make_press("kvzip", ratio=ratio), chunk_size=chunk_size)  # warm-up: probe shapes compiled
    plain, read_s = timed(lambda: prefill(model, document, make_press("full"), chunk_size=chunk_size))
    del plain
    compressed, compress_s = timed(lambda: prefill(model, document, make_press("kvzip", ratio=ratio), chunk_size=chunk_size))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "doc.kvc")
        size = save_cache(path, compressed.cache, {"benchmark": "e2e"})
        del compressed
        torch.cuda.empty_cache()

        row = {"length": len(ids), "ratio": ratio, "file_gib": size / 2**30, "compress_s": compress_s, "read_full_s": read_s,
               "kvzip_over_read": compress_s / read_s, "ttft_reread_s": reread_s}
        # The first load of a fresh process is what `kvcli ask doc.kvc` pays: each mode in its
        # own child process (its model built and its kernels warmed before the clock).
        # "prepared": the staging block page-locked while the model loads, as load_model does.
        for tag in ("pageable", "streamed", "prepared"):
            child = fresh_process_reuse(path, question[0].tolist(), tag)
            row.update({f"{tag}_{k}": v for k, v in child.items()})
            row[f"speedup_{tag}_first"] = reread_s / child["ttft_first_s"]
            row[f"speedup_{tag}_warm"] = reread_s / child["ttft_second_s"]
    return row


def fresh_process_reuse(path: str, question: list[int], mode: str) -> dict:
    """Run `--reuse-child` in a new interpreter and return what it measured."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "kvcli.benchmarks.e2e", "--reuse-child", path, "--question", ",".join(map(str, question)),
               "--load-mode", mode]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def reuse_child(path: str, question: list[int], mode: str) -> None:
    """In a fresh process: the model, warmed kernels, then load + question twice (first, second).
    mode: pageable (pin_memory=False), streamed, or prepared (streamed, with the staging block
    page-locked before the clock, as kvcli.models.load_model does while the model loads)."""
    from kvcli.attention import install
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill
    from kvcli.generate import forward
    from kvcli.store.kvcfile import load_cache

    model = build_model()
    install(model)
    q = torch.tensor([question], device="cuda")
    ids = torch.randint(0, 128000, (2048,), generator=torch.Generator().manual_seed(1)).tolist()
    warm = prefill(model, layout_for(ids, False), make_press("full"))  # the kernels a question runs, compiled or loaded
    _, warmup_s = timed(lambda: forward(model, warm.cache, q))
    del warm
    row = {"kernel_warmup_s": warmup_s}
    pinned = mode != "pageable"
    if mode == "prepared":
        from kvcli.store.kvcfile import prepare_staging

        _, row["prepare_staging_s"] = timed(lambda: prepare_staging("cuda"))
    for which in ("first", "second"):
        cache, load_s = timed(lambda: load_cache(path, device="cuda", dtype=torch.bfloat16, pin_memory=pinned)[0])
        _, question_s = timed(lambda: forward(model, cache, q).argmax(-1))
        row.update({f"load_{which}_s": load_s, f"ttft_{which}_s": load_s + question_s})
        del cache
    print(json.dumps(row), flush=True)


def compile_child() -> None:
    """In a fresh process: a 4K-token question-aware read (ada-snapkv, 20%) and 8 decode steps, twice."""
    from kvcli.attention import install
    from kvcli.compress.methods import make_press
    from kvcli.compress.pipeline import prefill
    from kvcli.generate import forward

    model = build_model()
    install(model)
    ids = torch.randint(0, 128000, (4096,), generator=torch.Generator().manual_seed(2)).tolist()
    row = {}
    for which in ("first", "second"):
        result, read_s = timed(lambda: prefill(model, layout_for(ids, True), make_press("ada-snapkv", ratio=0.2)))
        token = result.last_logits.argmax().view(1, 1)
        _, decode_s = timed(lambda: [forward(model, result.cache, token) for _ in range(8)])
        row.update({f"read_{which}_s": read_s, f"decode8_{which}_s": decode_s})
        del result
    print(json.dumps(row), flush=True)


def compile_cost() -> dict:
    """What the first call of a fresh process pays for Triton: with an empty on-disk kernel
    cache (a first install), then with that cache filled (every later process)."""
    import subprocess
    import sys

    report = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "TRITON_CACHE_DIR": cache_dir}
        for state in ("empty_disk_cache", "filled_disk_cache"):
            out = subprocess.run([sys.executable, "-m", "kvcli.benchmarks.e2e", "--compile-child"], env=env,
                                 check=True, capture_output=True, text=True, timeout=600).stdout
            report[state] = json.loads(out.strip().splitlines()[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--ratios", default="1.0,0.2,0.1")
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--reuse-length", type=int, default=32768)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-child", default=None, help=argparse.SUPPRESS)  # internal: see fresh_process_reuse
    parser.add_argument("--question", default="", help=argparse.SUPPRESS)
    parser.add_argument("--load-mode", default="prepared", help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-compile-cost", action="store_true", help="do not measure the first call's compilation")
    args = parser.parse_args()
    if args.reuse_child:
        return reuse_child(args.reuse_child, [int(x) for x in args.question.split(",")], args.load_mode)
    if args.compile_child:
        return compile_child()

    from kvcli.attention import install

    model = build_model()
    install(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tb_s": bandwidth / 1e12, "weight_gib": weight_bytes / 2**30, "rows": [], "reuse": None}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    generator = torch.Generator().manual_seed(0)
    for length in [int(x) for x in args.lengths.split(",") if x]:
        ids = torch.randint(0, 128000, (length,), generator=generator).tolist()
        if not args.skip_baseline:
            for backend in ("default", "flash"):
                try:
                    row = {"system": f"transformers-{backend}", "length": length, "ratio": 1.0, **baseline(model, torch.tensor([ids], device="cuda"), backend)}
                except Exception as exc:  # e.g. out of memory: record it, keep going
                    row = {"system": f"transformers-{backend}", "length": length, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    install(model)
                    torch.cuda.empty_cache()
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
        for ratio in [float(x) for x in args.ratios.split(",")]:
            try:
                row = {"system": "kvcli", "length": length, "ratio": ratio, **ours(model, ids, ratio, args.chunk_size, weight_bytes, bandwidth)}
            except Exception as exc:
                row = {"system": "kvcli", "length": length, "ratio": ratio, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                torch.cuda.empty_cache()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.reuse_length:
        ids = torch.randint(0, 128000, (args.reuse_length,), generator=generator).tolist()
        try:
            report["reuse"] = reuse(model, ids, 0.2, args.chunk_size)
        except Exception as exc:
            report["reuse"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(report["reuse"]), flush=True)
    if not args.skip_compile_cost:
        report["compile"] = compile_cost()
        print(json.dumps(report["compile"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
