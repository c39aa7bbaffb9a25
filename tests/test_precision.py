"""Precision per phase: what `auto` picks, --dtype, and caches crossing precisions.

A .kvc written from a bfloat16 read must load and answer in a float32 process, and one
written from a float32 read in a bfloat16 process; the answers must be those of the same
cache cast in memory (nothing lost or changed on the way through the file).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from kvcli import api, generate, precision
from kvcli.compress.methods import make_press
from kvcli.documents import Document, load_document
from kvcli.errors import KvcliError
from kvcli.models import LoadedModel, choose_precision, load_model
from kvcli.store import persist

TEXT = "The lighthouse keeper was Tomas Elling. His dog was named Biscuit. The lens cost 412 pounds. " * 3


# ---- what auto picks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, device, flags, expected",
    [
        ("auto", "cpu", {"amx_bf16", "avx512_bf16", "avx2"}, ("bfloat16", "float32")),
        ("auto", "cpu", {"avx512_bf16"}, ("bfloat16", "float32")),
        ("auto", "cpu", {"amx_bf16"}, ("bfloat16", "float32")),
        ("auto", "cpu", {"avx512f", "avx2", "fma"}, ("float32", "float32")),
        ("auto", "cpu", set(), ("float32", "float32")),
        ("auto", "cuda", set(), ("bfloat16", "bfloat16")),
        ("float32", "cpu", {"amx_bf16"}, ("float32", "float32")),
        ("bfloat16", "cpu", set(), ("bfloat16", "bfloat16")),
        ("float16", "cuda", set(), ("float16", "float16")),
        ("fp32", "cuda", set(), ("float32", "float32")),
        ("BF16", "cpu", set(), ("bfloat16", "bfloat16")),
        (None, "cpu", {"avx512_bf16"}, ("bfloat16", "float32")),
    ],
    ids=lambda v: ",".join(sorted(v)) if isinstance(v, set) else str(v),
)
def test_choose(requested, device, flags, expected):
    chosen = precision.choose(requested, device, frozenset(flags))
    assert (chosen.read, chosen.decode) == expected
    # only auto's mixed CPU reading is autocast; a named dtype casts the weights themselves
    assert chosen.autocast == (expected == ("bfloat16", "float32"))
    assert chosen.why


@pytest.mark.parametrize("bad", ["float64", "int8", "bf17", "auto,float32", "torch.float32"])
def test_parse_rejects(bad):
    with pytest.raises(KvcliError, match="unknown --dtype"):
        precision.parse(bad)


@pytest.mark.parametrize("value, name", [("", "auto"), (" ", "auto"), (None, "auto"), (" Float16 ", "float16"), ("half", "float16")])
def test_parse_accepts(value, name):
    assert precision.parse(value) == name


def test_models_choose_precision_reads_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert (choose_precision("auto", cpu).read, choose_precision("auto", cpu).decode) == ("bfloat16", "float32")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert (choose_precision(None, cpu).read, choose_precision(None, cpu).decode) == ("float32", "float32")
    forced = choose_precision(torch.bfloat16, cpu)  # a torch dtype forces both phases
    assert (forced.read, forced.decode) == ("bfloat16", "bfloat16")


def test_cpu_flags_agree_with_torch():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()


# ---- the reader copy and the cast for decoding ----------------------------------------


def _loaded(model, tokenizer, read: str, decode: str) -> LoadedModel:
    return LoadedModel(
        model, tokenizer, "tiny", "f" * 64, torch.device("cpu"), getattr(torch, decode), 4096, 0.0,
        precision=precision.Precision(read, decode, "test"),
    )


def test_reader_casts_weights_once_and_leaves_the_decoder(char_tokenizer):
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    loaded = _loaded(ours, char_tokenizer, "bfloat16", "float32")
    reader = loaded.reader()
    assert reader is loaded.reader() and reader.reader() is reader  # made once
    assert reader.model is not ours and reader.fingerprint == loaded.fingerprint and reader.dtype == torch.float32
    assert {p.dtype for p in reader.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert reader.model.lm_head.weight is reader.model.model.embed_tokens.weight or not ours.config.tie_word_embeddings
    for (name, a), (_, b) in zip(ours.named_parameters(), reader.model.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    same = _loaded(ours, char_tokenizer, "float32", "float32")
    assert same.reader() is same


def test_reading_under_autocast_keeps_float32_weights_and_cache(char_tokenizer):
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    fp32 = _loaded(ours, char_tokenizer, "float32", "float32")
    mixed = LoadedModel(ours, char_tokenizer, "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0,
                        precision=precision.Precision("bfloat16", "float32", "test", autocast=True))
    doc, press = _document(TEXT), make_press("full")  # every row kept: the rows line up
    with fp32.reading() as reader:
        assert reader is fp32 and not torch.is_autocast_enabled("cpu")
        exact = api.read(reader, doc, press)
    with mixed.reading() as reader:
        assert reader is mixed and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        approx = api.read(reader, doc, press)
    assert not torch.is_autocast_enabled("cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.float32}  # no copy, no cast of the weights
    for a, b in zip(exact.cache.layers, approx.cache.layers):
        assert b.keys.dtype == b.values.dtype == torch.float32 and torch.equal(a.lengths, b.lengths)
        ka, kb = a.head_rows(0, 0)[0], b.head_rows(0, 0)[0]
        diff = (ka - kb).norm() / ka.norm()
        assert 0 < diff < 0.02  # computed in bf16 (not bit-equal to float32), and close to it


def test_in_dtype_casts_a_copy(char_tokenizer):
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    reader = _loaded(ours, char_tokenizer, "bfloat16", "float32").reader()
    doc = _document(TEXT)
    compressed = api.read(reader, doc, make_press("snapkv", ratio=0.5))
    cache = compressed.cache
    assert cache.layers[0].keys.dtype == torch.bfloat16
    lengths = [layer.lengths.clone() for layer in cache.layers]
    cast = generate.in_dtype(cache, torch.float32)
    assert all(layer.keys.dtype == layer.values.dtype == torch.float32 for layer in cast.layers)
    for a, b in zip(cache.layers, cast.layers):
        assert torch.equal(a.keys.float(), b.keys) and torch.equal(a.values.float(), b.values)
    cast.reserve(4)
    generate.forward(ours, cast, torch.tensor([[5, 6]]))
    assert all(torch.equal(layer.lengths, before) for layer, before in zip(cache.layers, lengths))  # the original is untouched
    assert generate.in_dtype(cast, torch.float32) is cast


# ---- the Python API and the store use the per-phase precision too --------------------------


def _autocast_loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0,
                       precision=precision.Precision("bfloat16", "float32", "test", autocast=True))


def test_api_read_uses_the_reading_precision(char_tokenizer):
    """api.read called bare (as Python users and the server call it) reads as `kvcli ask`
    does inside loaded.reading(): the same rows, which are not float32's."""
    from kvcli.compress.reading import read as read_in_weights_dtype
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    mixed = _autocast_loaded(ours, char_tokenizer)
    doc, press = _document(TEXT), make_press("full")
    bare = api.read(mixed, doc, press)
    assert not torch.is_autocast_enabled("cpu")
    with mixed.reading() as reader:
        as_the_cli_reads = read_in_weights_dtype(reader, doc, press)
    fp32 = read_in_weights_dtype(mixed, doc, press)  # no autocast: the weights' float32
    for a, b, c in zip(bare.cache.layers, as_the_cli_reads.cache.layers, fp32.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert not torch.equal(a.keys, c.keys)


def test_api_ask_decodes_a_bfloat16_read_in_float32(char_tokenizer):
    """Weights cast for reading (read bfloat16, decode float32): api.ask reads in bfloat16
    and answers as the CLI does (the kept rows cast to float32 once), not in bfloat16."""
    from dataclasses import replace

    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    loaded = _loaded(ours, char_tokenizer, "bfloat16", "float32")
    doc, press, question = _document(TEXT), make_press("snapkv", ratio=0.5), "Who kept it?"
    generation = api.Generation(max_new_tokens=6)
    result, compressed = api.ask(loaded, doc, question, press=press, generation=generation)
    assert compressed.cache.layers[0].keys.dtype == torch.bfloat16  # read by the bfloat16 weights
    again = api.read(loaded, doc, press, question=question, headroom_tokens=6)
    (expected,) = api.answer(loaded, replace(again, cache=generate.in_dtype(again.cache, torch.float32)), [question], generation)
    assert result.answer == expected.answer and result.tokens == expected.tokens > 0


def test_reuse_store_keeps_readings_of_each_precision_apart(char_tokenizer):
    """A bfloat16-autocast read stores float32 rows, as a float32 read does: the store key
    and the header's read_precision keep the two apart."""
    from tests.support import tiny_llama

    from kvcli.store.kvcfile import read_header

    _, ours = tiny_llama(8, 2, layers=2)
    fp32, mixed = _loaded(ours, char_tokenizer, "float32", "float32"), _autocast_loaded(ours, char_tokenizer)
    assert fp32.precision.reading == "float32" and mixed.precision.reading == "bfloat16 autocast"
    doc, press = _document(TEXT), make_press("snapkv", ratio=0.5)
    assert persist.store_key(fp32, doc, press, "auto") != persist.store_key(mixed, doc, press, "auto")
    first, hit, _ = persist.reuse(fp32, doc, press)
    assert not hit and read_header(first.source).stats["read_precision"] == "float32"
    other, hit, warning = persist.reuse(mixed, doc, press)
    assert not hit and warning is None and other.source != first.source
    assert read_header(other.source).stats["read_precision"] == "bfloat16 autocast"
    assert persist.reuse(mixed, doc, press)[1] and persist.reuse(fp32, doc, press)[1]  # each finds its own
    # A float32 reading planted at the autocast key is refused, and replaced.
    os.replace(first.source, other.source)
    replaced, hit, warning = persist.reuse(mixed, doc, press)
    assert not hit and "was read in float32, not bfloat16 autocast" in warning
    assert read_header(replaced.source).stats["read_precision"] == "bfloat16 autocast"


def _document(text: str) -> Document:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "doc.txt")
    with open(path, "w") as f:
        f.write(text)
    return load_document(path)


# ---- a .kvc crossing precisions, in real processes ------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def save_tiny_model(directory):
    """A random Llama and a byte-level tokenizer saved as a Hugging Face directory (--model DIR)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=vocab["<|endoftext|>"],
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _kvcli(args, cache_dir):
    env = {**os.environ, "KVCLI_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    env.pop("KVCLI_DTYPE", None)
    result = subprocess.run([sys.executable, "-m", "kvcli.cli.main", *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("written, answered", [("bfloat16", "float32"), ("float32", "bfloat16"), ("auto", "bfloat16")])
def test_kvc_crosses_precisions(tmp_path, tiny_model_dir, written, answered):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    kvc = tmp_path / "doc.kvc"
    out = _kvcli(["compress", str(doc), "-o", str(kvc), "--model", str(tiny_model_dir), "--method", "snapkv", "--ratio", "0.5",
                  "--dtype", written, "--json"], tmp_path)
    chosen = precision.choose(written, "cpu", precision.cpu_flags())
    assert json.loads(out.stdout)["precision"]["read"] == chosen.read
    assert json.loads(out.stdout)["precision"]["read_autocast"] == chosen.autocast
    # the file holds the cache as read: bf16 from bf16 weights, fp32 from fp32 weights (autocast included)
    stored = {"float32": "fp32", "bfloat16": "bf16"}[chosen.decode if chosen.autocast else chosen.read]
    from kvcli.store.kvcfile import read_header

    header = read_header(kvc)
    assert header.kv_dtype == stored and header.source_dtype == stored

    question = "Who kept the lighthouse?"
    out = _kvcli(["ask", str(kvc), question, "--model", str(tiny_model_dir), "--dtype", answered, "--json", "--max-new-tokens", "8"], tmp_path)
    record = json.loads(out.stdout)
    assert record["precision"]["stored"] == stored and record["precision"]["decode"] == answered
    assert record["model"]["dtype"] == answered
    timings = record["timings"]
    # measured from the process start: imports and the model load come before the answer's first token
    assert timings["wall_to_first_token_seconds"] >= timings["ttft_seconds"] + timings["model_load_seconds"] - 0.02

    # The same cache, read and cast in memory, answers the same tokens.
    model = load_model(str(tiny_model_dir), device="cpu", dtype=answered)
    assert model.dtype == getattr(torch, answered)
    from_file, _ = persist.load(model, kvc)
    assert from_file.cache.layers[0].keys.dtype == model.dtype
    writer = load_model(str(tiny_model_dir), device="cpu", dtype=written)
    with writer.reading() as reader:
        in_memory = api.read(reader, _document(TEXT), make_press("snapkv", ratio=0.5))
    for a, b in zip(in_memory.cache.layers, from_file.cache.layers):
        assert torch.equal(a.lengths, b.lengths)
        for h in range(a.num_kv_heads):  # every kept row, cast once on the way in
            (ka, va, pa), (kb, vb, pb) = a.head_rows(0, h), b.head_rows(0, h)
            assert torch.equal(ka.to(model.dtype), kb) and torch.equal(va.to(model.dtype), vb) and torch.equal(pa, pb)
    decoding = generate.in_dtype(in_memory.cache, model.dtype)
    from dataclasses import replace

    generation = api.Generation(max_new_tokens=8)
    (expected,) = api.answer(model, replace(in_memory, cache=decoding), [question], generation)
    (again,) = api.answer(model, from_file, [question], generation)
    assert expected.tokens > 0
    assert record["answer"] == expected.answer == again.answer


# ---- start-up: the model loads fast, and the same ------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_direct_load_is_from_pretrained(tiny_model_dir, dtype):
    """The meta-device load used at start-up gives from_pretrained's model: weights, buffers,
    config (so the fingerprint, which .kvc files are checked against) and logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcli import models

    torch_dtype = getattr(torch, dtype)
    direct = models._load_direct(tiny_model_dir, torch_dtype, models._tied_key_mapping(tiny_model_dir))
    assert direct is not None
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype)
    assert direct.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(direct.state_dict()[name], tensor), name
    for (name, a), (_, b) in zip(direct.named_buffers(), reference.named_buffers()):
        assert a.device.type == "cpu" and torch.equal(a, b), name
    assert direct.lm_head.weight is direct.model.embed_tokens.weight
    assert direct.config.to_dict() == reference.config.to_dict()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(direct.eval()(ids).logits, reference.eval()(ids).logits)


def test_tied_weights_stored_as_lm_head_load_directly(tmp_path, tiny_model_dir):
    """Our GGUF conversions store the tied embedding as lm_head.weight (safetensors' save_model)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from kvcli import models

    local = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, local)
    state = load_file(str(local / "model.safetensors"))
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, str(local / "model.safetensors"), metadata={"format": "pt"})
    mapping = models._tied_key_mapping(local)
    assert mapping is not None and models._tied_key_mapping(tiny_model_dir) is None
    direct = models._load_direct(local, torch.float32, mapping)
    assert torch.equal(direct.model.embed_tokens.weight, state["lm_head.weight"])
    assert direct.lm_head.weight is direct.model.embed_tokens.weight
