"""Cross-check kvcli's selections against kvpress on the same random model and tokens.

Per (layer, KV head) the set of kept document positions of a kvcli method is compared
with kvpress's (an independent implementation). kvpress pins transformers<5.3, so it
lives in its own virtual env and runs as a subprocess on `crosscheck_kvpress.py`
(which imports only torch, transformers and kvpress):

    python3 -m venv /tmp/kv/kvpress-venv
    /tmp/kv/kvpress-venv/bin/pip install torch==2.13.0 kvpress
    OMP_NUM_THREADS=1 .venv/bin/python -m kvcli.benchmarks.crosscheck \\
        --kvpress-python /tmp/kv/kvpress-venv/bin/python [--json out.json]

Not part of CI (it needs the second env). A small random Llama (4 layers, 8 query heads,
2 KV heads, head_dim 16, seed 0, init std 0.2 and keys scaled by 2^-3..2^3 per KV head, so
attention is peaked, of different sharpness per head, rather than uniform)
and a byte-level tokenizer with a chat template "SYS:" + user + "\\nA:" are saved with
`save_pretrained` to a temp dir that both sides load. Token ids are random bytes (seed 0).

Settings that differ between the two implementations, and how each row aligns them
(rows marked "shipped" leave a difference in on purpose, to show its size):

- Budget. kvcli counts document tokens per head and always keeps the prefix and the
  question on top; kvpress's `n_kept = int(k_len (1 - compression_ratio))` counts every
  token, the window included. Aligned: no prefix for the window methods, and a
  compression_ratio for which kvpress keeps exactly budget + window per head (KVzip: the
  same total over layers x heads as kvcli kept, plus the 4 sinks).
- Question-aware window. kvcli observes with the whole question part (at least 32
  tokens); kvpress with its last `window_size` tokens. Aligned: a 40-token question and
  kvpress window_size=40, so both windows are exactly the question, kept by both.
- Pooling. kvcli: average, kernel 7, edges averaged over real tokens only
  (count_include_pad=False). kvpress: kernel 5, zero padding counted at the edges.
  Aligned rows use kernel 7 and an edge-exact subclass of SnapKVPress.
- GQA/window reduction. kvcli sums over window queries then averages the group, then
  pools; kvpress averages queries, pools per query head, averages the group: the same
  ranking (linear), float rounding aside. Not changed.
- Ada-KV floor. kvpress's safeguard is int(alpha n_kept) with the window inside n_kept,
  and the window tokens (score max+1) fill it first, so the document floor is
  int(0.2 (b + W)) - W; kvcli's is int(0.2 b) document tokens. Aligned: alpha chosen so
  kvpress's document floor is kvcli's. One extra row compares kvcli's Ada with the Ada-KV
  authors' own allocation (FFY0/AdaKV: round(c_h (1 - alpha) + int(alpha b)), c_h from one
  top-k at the full budget), re-implemented in the side script on kvpress's scores.
- KVzip. Same probe text and chat-template suffix; scoring chunk 128 tokens on both
  sides (to get 1, 3 and 8 chunks from short documents; both default to 2048); the 4-token
  prefix is kvpress's n_sink=4 sinks and kvcli's always-kept prefix; one global top-k over
  layers x heads (kvcli's candidates are capped at max_factor x budget per head, reported).
  kvcli departs from kvpress (and the snu-mllab reference) in three ways for documents
  longer than one chunk; the rows add them to kvpress one at a time:
    + same prompt    every chunk reuses the first chunk's probe prompt (kvpress: "Repeat the
                     part of the previous context exactly, starting with" + the previous
                     chunk's last 8 tokens)
    + whole softmax  the probe's softmax over the whole context + itself, not [4 sinks,
                     its chunk, itself] (still scoring its own chunk only)
    + max over chunks  a token's score is the max over every chunk's probe
  With all three kvpress reproduces kvcli's current KVzip; stock kvpress is the reference
  (one more row swaps in the snu-mllab reference's continuation prompt, which ends
  "starting with " with a space that kvpress's lacks: a faithful kvcli must pick one).
  Once kvcli's KVzip is faithful, the stock (or that reference-prompt) row is the one that
  must be exact at 3 and 8 chunks, and the "+ all three" rows will diverge.

Overlap per (layer, head) is |A n B| / |A u B| of the kept document positions; "equal"
counts heads with identical sets; "differ" is the share of kvcli's kept document tokens
that kvpress did not keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcli.compress.methods import make_press
from kvcli.compress.pipeline import prefill
from kvcli.prompts import ChatTemplate, PromptLayout

SIDE_SCRIPT = Path(__file__).with_name("crosscheck_kvpress.py")
DEFAULT_KVPRESS_PYTHON = os.environ.get("KVCLI_KVPRESS_PYTHON", "/tmp/kv/kvpress-venv/bin/python")

# The tokenizer's chat template: "SYS:" is the 4-token prefix, "\nA:" opens the answer.
CHAT_TEMPLATE = "SYS:{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '\\nA:' }}{% endif %}"
TEMPLATE = ChatTemplate(prefix="SYS:", middle="\n\n", suffix="\nA:")  # what kvcli's layout uses

QUESTION_TOKENS = 40
WINDOW_DOC = 800  # document tokens for the window methods
BUDGET = 150  # document tokens per KV head for the window methods
ADA_BUDGETS = (150, 40)  # the floor binds more at the small one
ALPHA = 0.2
KVZIP_CHUNK = 128
KVZIP_DOCS = {1: 120, 3: 370, 8: 1000}  # chunks -> document tokens
KVZIP_RATIO = 0.25


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer():
    """One token per byte (ids = byte values), with the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, chat_template=CHAT_TEMPLATE)


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,  # peaked attention: few near-ties for float rounding to flip
    )
    model = LlamaForCausalLM(config).eval()
    # Heads of different sharpness (keys scaled by 2^-3 .. 2^3 per KV head), so that Ada-KV's
    # allocation moves budget between heads and its floor binds at the small budget.
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            scale = 2.0 ** (6 * torch.rand(config.num_key_value_heads) - 3.0)
            layer.self_attn.k_proj.weight.view(config.num_key_value_heads, head_dim, -1).mul_(scale[:, None, None])
    return model


@dataclass
class Case:
    name: str  # row label
    method: str  # kvcli method
    setting: str
    spec: dict  # the kvpress run
    kvcli: str  # key of the kvcli run to compare with
    chunks: int | None = None


def kvcli_kept(model, layout: PromptLayout, press) -> list[list[set[int]]]:
    """Kept document positions per layer and KV head."""
    result = prefill(model, layout, press)
    start, stop = layout.document_range
    kept = []
    for layer in result.cache.layers:
        heads = []
        for h in range(layer.num_kv_heads):
            lo, n = int(layer.offsets[h]), int(layer.lengths[0, h])
            heads.append({p for p in layer.positions[0, lo : lo + n].tolist() if start <= p < stop})
        kept.append(heads)
    return kept


def compare(ours: list[list[set[int]]], theirs: list[list[list[int]]], doc: tuple[int, int], always: set[int]) -> dict:
    """Kept document positions, kvcli (ours) vs kvpress (theirs); `always`: positions both must keep."""
    start, stop = doc
    equal = total = 0
    missing = sum(len(always - set(b)) for layer in theirs for b in layer)
    overlaps, differ, kept = [], 0, 0
    for our_layer, their_layer in zip(ours, theirs):
        for a, b_list in zip(our_layer, their_layer):
            b = {p for p in b_list if start <= p < stop}
            union = a | b
            overlaps.append(len(a & b) / len(union) if union else 1.0)
            equal += a == b
            total += 1
            differ += len(a - b)
            kept += len(a)
    return {
        "heads_equal": equal,
        "heads": total,
        "mean_overlap": sum(overlaps) / len(overlaps),
        "min_overlap": min(overlaps),
        "differ": differ / max(kept, 1),
        "kvpress_dropped_always_kept": missing,
        "kept_per_head": [min(len(a) for layer in ours for a in layer), max(len(a) for layer in ours for a in layer)],
    }


def always_kept(layout: PromptLayout, case: Case) -> set[int]:
    """What both sides keep outside the budget: the question (window methods) or the 4 sinks (KVzip)."""
    start, stop = layout.document_range
    if case.method == "kvzip":
        return set(range(4))
    return set(range(stop, len(layout.all_ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvpress-python", default=DEFAULT_KVPRESS_PYTHON, help="python of the env where kvpress is installed")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.kvpress_python).exists():
        sys.exit(f"kvpress env not found at {args.kvpress_python}: create it (see this module's docstring) or pass --kvpress-python")

    import transformers

    from kvcli.attention import install

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(args.seed)
    scratch = tempfile.TemporaryDirectory(prefix="kvcli-crosscheck-")
    workdir = Path(scratch.name)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    install(model)
    prefix_ids = list(tokenizer("SYS:", add_special_tokens=False)["input_ids"])
    assert len(prefix_ids) == 4

    def random_ids(n: int) -> list[int]:
        return torch.randint(32, 127, (n,), generator=rng).tolist()

    kvcli_runs: dict[str, tuple] = {}
    cases: list[Case] = []

    # Window methods, question-aware: [document][question], no prefix.
    doc, question = random_ids(WINDOW_DOC), random_ids(QUESTION_TOKENS)
    layout = PromptLayout(tokenizer=tokenizer, template=TEMPLATE, prefix_ids=[], document_ids=doc, question_ids=question)
    for method, budget in [("snapkv", BUDGET), ("streaming", BUDGET)] + [(m, b) for b in ADA_BUDGETS for m in ("ada-snapkv", "ada-snapkv-topk")]:
        press = make_press(method, budget=budget)
        kvcli_runs[f"{method}-{budget}"] = (kvcli_kept(model, layout, press), layout, press)

    def window_spec(budget: int, **extra) -> dict:
        return {"input_ids": layout.all_ids, "window": QUESTION_TOKENS, "n_kept": budget + QUESTION_TOKENS, **extra}

    snap, stream = f"snapkv-{BUDGET}", f"streaming-{BUDGET}"
    cases += [
        Case("SnapKV", "snapkv", f"b={BUDGET} shipped: kernel 5, padded edges", window_spec(BUDGET, press="snapkv", kernel=5), snap),
        Case("SnapKV", "snapkv", f"b={BUDGET} kernel 7, padded edges", window_spec(BUDGET, press="snapkv", kernel=7), snap),
        Case("SnapKV", "snapkv", f"b={BUDGET} aligned: kernel 7, edges over real tokens", window_spec(BUDGET, press="snapkv-nopad", kernel=7), snap),
    ]
    for b in ADA_BUDGETS:
        aligned_alpha = (int(ALPHA * b) + QUESTION_TOKENS + 0.5) / (b + QUESTION_TOKENS)
        kvpress_floor = max(int(ALPHA * (b + QUESTION_TOKENS)) - QUESTION_TOKENS, 0)
        cases += [
            Case("Ada-SnapKV-topk", "ada-snapkv-topk", f"b={b} kvpress alpha {ALPHA}: doc floor {kvpress_floor} vs kvcli {int(ALPHA * b)}",
                 window_spec(b, press="ada-nopad", kernel=7, alpha=ALPHA), f"ada-snapkv-topk-{b}"),
            Case("Ada-SnapKV-topk", "ada-snapkv-topk", f"b={b} aligned: doc floor {int(ALPHA * b)} on both",
                 window_spec(b, press="ada-nopad", kernel=7, alpha=aligned_alpha), f"ada-snapkv-topk-{b}"),
            Case("Ada-SnapKV", "ada-snapkv", f"b={b} the Ada-KV authors' rule round(c(1-a)+floor), both sides",
                 window_spec(b, press="ada-authors", kernel=7, alpha=ALPHA), f"ada-snapkv-{b}"),
        ]
    cases.append(Case("StreamingLLM", "streaming", f"b={BUDGET} aligned: 4 sinks + recent", window_spec(BUDGET, press="streaming", n_sink=4), stream))

    # KVzip, question-agnostic: [4-token prefix = sinks][document].
    ladder = [
        ("stock kvpress (reference behaviour)", {}),
        ("kvpress + the reference's 'starting with ' (space)", {"reference_prompt": True}),
        ("+ same prompt", {"same_prompt": True}),
        ("+ same prompt + whole softmax", {"same_prompt": True, "whole_softmax": True}),
        ("+ all three (= kvcli before the faithful KVzip)", {"same_prompt": True, "whole_softmax": True, "max_over_chunks": True}),
    ]
    num_layers, num_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    for chunks, doc_len in KVZIP_DOCS.items():
        layout = PromptLayout(tokenizer=tokenizer, template=TEMPLATE, prefix_ids=prefix_ids, document_ids=random_ids(doc_len), question_ids=[])
        press = make_press("kvzip", ratio=KVZIP_RATIO)
        press.scorer.chunk_size = KVZIP_CHUNK
        key = f"kvzip-{chunks}"
        kept = kvcli_kept(model, layout, press)
        kvcli_runs[key] = (kept, layout, press)
        total = sum(len(h) for layer in kept for h in layer) + len(prefix_ids) * num_layers * num_kv
        spec = {"input_ids": layout.prefix_ids + layout.document_ids, "press": "kvzip", "chunk_size": KVZIP_CHUNK, "total_kept": total}
        steps = ladder if chunks > 1 else ladder[:1]
        for label, flags in steps:
            cases.append(Case("KVzip", "kvzip", label, {**spec, **flags}, key, chunks))

    job = {"model_dir": str(model_dir), "runs": [{**c.spec, "name": f"{i}"} for i, c in enumerate(cases)]}
    job_path, out_path = workdir / "job.json", workdir / "kvpress.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([args.kvpress_python, str(SIDE_SCRIPT), str(job_path), str(out_path)], check=True, env=env)
    theirs = json.loads(out_path.read_text())
    scratch.cleanup()

    rows = []
    for i, case in enumerate(cases):
        kept, layout, press = kvcli_runs[case.kvcli]
        row = {"method": case.name, "chunks": case.chunks, "setting": case.setting, **compare(kept, theirs[str(i)]["kept"], layout.document_range, always_kept(layout, case))}
        if case.method == "kvzip":
            cap = press.policy.cap(KVZIP_RATIO * len(layout.document_ids), len(layout.document_ids))
            row["heads_at_cap"] = sum(len(h) >= cap for layer in kept for h in layer)
        rows.append(row)

    versions = theirs["versions"]
    print(f"kvpress {versions['kvpress']} (transformers {versions['transformers']}, torch {versions['torch']}) vs kvcli "
          f"(transformers {transformers.__version__}, torch {torch.__version__})")
    print(f"random Llama: {num_layers} layers, 8 query / {num_kv} KV heads, head_dim 16, seed {args.seed}")
    print(f"window methods: {WINDOW_DOC} document + {QUESTION_TOKENS} question tokens, budget b per KV head; "
          f"KVzip: ratio {KVZIP_RATIO}, chunk {KVZIP_CHUNK}, documents {KVZIP_DOCS}")
    print(f"aligned on both sides: the window is the {QUESTION_TOKENS}-token question (kept by both, no prefix); "
          f"b document tokens per head (kvpress n_kept = b + {QUESTION_TOKENS})")
    print(f"  KVzip: chunk {KVZIP_CHUNK} on both; 4-token prefix = kvpress's 4 sinks; kvpress keeps kvcli's total + the sinks")
    print()
    header = (f"{'method':<13}{'chunks':>6}  {'setting':<56}{'kvcli kept/head':>16}{'equal (l,h)':>12}"
              f"{'mean ovl':>10}{'min ovl':>9}{'differ':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        chunks = "" if r["chunks"] is None else str(r["chunks"])
        span = "{}-{}".format(*r["kept_per_head"])
        print(f"{r['method']:<13}{chunks:>6}  {r['setting']:<56}{span:>16}{r['heads_equal']:>7}/{r['heads']:<4}"
              f"{r['mean_overlap']:>10.4f}{r['min_overlap']:>9.4f}{100 * r['differ']:>7.2f}%")
    dropped = [r for r in rows if r["kvpress_dropped_always_kept"]]
    print(f"\nrows where kvpress dropped a question/sink token: {len(dropped)}")
    caps = {r["chunks"]: r["heads_at_cap"] for r in rows if "heads_at_cap" in r}
    print(f"KVzip heads at kvcli's candidate cap (max_factor x budget), by chunks: {caps}")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
