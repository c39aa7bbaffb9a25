"""The llama.cpp peer benchmark's helpers: the random Llama-shaped GGUF it writes loads in
both engines with the shapes asked for, and its answer matching is the one it claims."""

import subprocess
import sys

import pytest

from kvcli.benchmarks import peers
from kvcli.models import embedded_gguf

TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "rope_theta": 10000.0, "context": 512}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return peers.write_random_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", embedded_gguf(), TINY)


def test_random_gguf_has_the_shapes_and_the_tokenizer(tiny_gguf):
    from gguf import GGMLQuantizationType, GGUFReader

    reader, source = GGUFReader(tiny_gguf), GGUFReader(embedded_gguf())
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * TINY["layers"]  # embedding, final norm; 2 norms + 7 matrices a layer
    assert "output.weight" not in tensors  # tied, as in Llama-3.2-1B
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [TINY["hidden"], vocab]  # GGUF lists ne0 first
    assert [int(n) for n in tensors["blk.1.attn_k.weight"].shape] == [TINY["hidden"], TINY["kv_heads"] * TINY["hidden"] // TINY["heads"]]
    assert [int(n) for n in tensors["blk.0.ffn_down.weight"].shape] == [TINY["ffn"], TINY["hidden"]]
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32

    def value(r, key):
        field = r.fields[key]
        return field.contents() if hasattr(field, "contents") else [bytes(field.parts[i]) for i in field.data]

    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert value(reader, key) == value(source, key), key
    assert value(reader, "llama.attention.head_count_kv") == TINY["kv_heads"]
    assert not tiny_gguf.with_name(tiny_gguf.name + ".partial").exists()


def test_kvcli_loads_the_random_gguf(tiny_gguf, default_model):
    from kvcli.models import load_model

    model = load_model(str(tiny_gguf), device="cpu", dtype="float32")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    question = "Who audited the accounts?"
    assert model.tokenizer.encode(question) == default_model.tokenizer.encode(question)  # so both engines get the same ids


def test_llama_cpp_loads_the_random_gguf(tiny_gguf):
    pytest.importorskip("llama_cpp")
    code = (
        "import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); "
        "print(m.n_vocab(), m.n_embd())"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["49152", "64"]


@pytest.mark.parametrize(
    "answer, expected, found",
    [
        ("The accounts were audited by Halvorsen & Pike.", ["Halvorsen & Pike"], True),
        ("Revenue was $48.6 million in 2024", ["$48.6 million"], True),
        ("Revenue was 41.9 million", ["48.6"], False),
        ("DULUTH, Minnesota", ["Duluth"], True),
    ],
)
def test_contains_expected(answer, expected, found):
    assert peers.contains_expected(answer, expected) is found


def test_agree_ignores_case_spacing_and_trailing_punctuation():
    assert peers.agree("Halvorsen & Pike.", "  halvorsen  & pike")
    assert not peers.agree("Halvorsen & Pike", "Halvorsen")
