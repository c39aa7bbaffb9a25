import copy
import os

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter; must be set before triton loads.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own kvcli cache dir: nothing a test writes outlives it."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "kvcli-cache"))
    monkeypatch.delenv("KVCLI_SERVER", raising=False)  # a developer's running server must not answer tests


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """A cache dir shared by the tests that load the embedded model (converted once, ~20 s)."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def default_model(model_cache_dir):
    from kvcli.models import load_model

    previous = os.environ.get("KVCLI_CACHE_DIR")
    os.environ["KVCLI_CACHE_DIR"] = model_cache_dir
    try:
        return load_model("default", device="cpu")
    finally:
        if previous is None:
            os.environ.pop("KVCLI_CACHE_DIR", None)
        else:
            os.environ["KVCLI_CACHE_DIR"] = previous


class CharTokenizer:
    """A tokenizer for random models: one token per character, no chat template."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i % 26) for i in ids)

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


def tiny_llama(num_heads=8, num_kv_heads=2, layers=3, seed=0):
    """(reference transformers model, the same weights routed through kvcli)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcli.attention import install

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=16 * num_heads,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
    )
    reference = LlamaForCausalLM(copy.deepcopy(config)).eval()
    ours = LlamaForCausalLM(copy.deepcopy(config)).eval()
    ours.load_state_dict(reference.state_dict())
    install(ours)
    return reference, ours


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()
