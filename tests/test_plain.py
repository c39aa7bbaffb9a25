"""kvcli.plain, the decoder and tokenizer without transformers (follow-ups from .kvc files),
held equal to the transformers path: logits on random Llama configurations, the embedded
model's tokenizer and chat template, and a whole follow-up answer from a saved file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from kvcli import api, generate, plain
from kvcli import models
from kvcli.models import LoadedModel, load_model
from tests.support import make_cache

ROOT = Path(__file__).resolve().parent.parent


def transformers_llama(tmp_path: Path, **overrides):
    """A random transformers Llama routed through kvcli, and its folder as kvcli converts one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcli.attention import install

    torch.manual_seed(0)
    settings = dict(vocab_size=256, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                    num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(LlamaConfig(**(settings | overrides))).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a missed one shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    install(model)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_model(model, str(folder / "model.safetensors"))
    return model, folder


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ],
    ids=["untied", "tied", "biases", "llama3-rope"],
)
def test_plain_decoder_gives_transformers_logits_over_a_compressed_cache(tmp_path, overrides):
    reference, folder = transformers_llama(tmp_path, **overrides)
    ours = plain.load_weights(folder, torch.float32)
    assert ours is not None
    caches = [make_cache(3, num_layers=3, num_heads=2, head_dim=16, tokens=200, headroom=16) for _ in range(2)]
    steps = [torch.tensor([[5, 17, 200, 3, 99]]), torch.tensor([[42]]), torch.tensor([[7]])]  # a question part, then decoding
    for ids in steps:
        want = generate.forward(reference, caches[0], ids)
        got = generate.forward(ours, caches[1], ids)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):  # the same rows appended
        assert torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(b.keys, a.keys, atol=2e-5, rtol=1e-5)


def test_plain_loader_declines_what_it_does_not_cover(tmp_path):
    """Another family or RoPE type, or a folder it cannot read: None, so transformers loads it."""
    _, folder = transformers_llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for change in ({"model_type": "qwen3"}, {"hidden_act": "gelu"}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}):
        (folder / "config.json").write_text(json.dumps(config | change))
        assert plain.load_weights(folder, torch.float32) is None, change
    (folder / "config.json").write_text("{not json")
    assert plain.load_weights(folder, torch.float32) is None
    (folder / "config.json").write_text(json.dumps(config))
    assert plain.load_weights(folder, torch.float32) is not None
    (folder / "model.safetensors").unlink()
    assert plain.load_weights(folder, torch.float32) is None


def test_stop_tokens_follow_the_generation_config_as_transformers_does(tmp_path):
    """Llama 3.1's folders list several end tokens in generation_config.json: all of them stop."""
    _, folder = transformers_llama(tmp_path, eos_token_id=2)
    assert plain.load_weights(folder, torch.float32).generation_config.eos_token_id == 2
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    assert plain.load_weights(folder, torch.float32).generation_config.eos_token_id == [2, 7, 9]


def test_the_plain_model_refuses_to_read_documents(tmp_path):
    _, folder = transformers_llama(tmp_path)
    loaded = LoadedModel(plain.load_weights(folder, torch.float32), None, "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0, plain=True)
    with pytest.raises(Exception, match="answer from .kvc files only"):
        loaded.reader()


# ---- the embedded model ---------------------------------------------------------------


def converted_folder(model: LoadedModel) -> Path:
    (folder,) = [p for p in (Path(os.environ["KVCLI_CACHE_DIR"]) / "models").iterdir() if p.name.startswith("SmolLM2")]
    return folder


@pytest.fixture
def embedded(default_model, model_cache_dir, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", model_cache_dir)
    return default_model


def test_plain_tokenizer_matches_the_transformers_tokenizer(embedded):
    ours = plain.PlainTokenizer(converted_folder(embedded))
    theirs = embedded.tokenizer
    texts = ["Who audited the accounts?", "  leading spaces, trailing  ", "Revenue: $4.2m (2023) — up 12%.\n\nNext line",
             "<|im_start|>user\nhi<|im_end|>", "naïve café 東京 🙂", ""]
    for text in texts:
        for special in (False, True):
            assert ours(text, add_special_tokens=special)["input_ids"] == theirs(text, add_special_tokens=special)["input_ids"], text
        ids = theirs(text, add_special_tokens=False)["input_ids"] + [theirs.eos_token_id]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.get_vocab() == theirs.get_vocab()
    messages = [{"role": "user", "content": "Read this.\n\n<document>\nX\n</document>\n\nQ?"}]
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )


def test_a_follow_up_from_a_kvc_file_answers_the_same_without_transformers(embedded, tmp_path):
    """The whole path: a file saved by the transformers model, answered by both. The plain
    load takes the fingerprint transformers computed for these very files, and without one
    (files it has not seen) declines."""
    from kvcli.compress.methods import make_press
    from kvcli.documents import load_document
    from kvcli.store import persist

    document = load_document(str(ROOT / "samples" / "field_notes.txt"))
    path = tmp_path / "notes.kvc"
    persist.compress(embedded, document, make_press("kvzip", ratio=0.25), path)
    follower = load_model("default", device="cpu", plain=True)
    assert follower.plain and follower.fingerprint == embedded.fingerprint and follower.dtype == embedded.dtype
    assert models._load_plain(converted_folder(embedded), "gguf:other", torch.device("cpu"), torch.float32) is None
    generation = api.Generation(max_new_tokens=20)
    questions = ["Where was the station?", "What was measured?"]
    answers, cited = {}, {}
    for name, model in (("transformers", embedded), ("plain", follower)):
        loaded, _ = persist.load(model, path)
        answers[name] = [a.answer for a in api.answer(model, loaded, questions, generation)]
        loaded, _ = persist.load(model, path)
        (result,) = api.answer(model, loaded, questions[:1], generation, cite=True)  # the citation pass runs the decoder too
        cited[name] = [(c.page, round(c.share, 5)) for c in result.citations]
    assert answers["plain"] == answers["transformers"]
    assert cited["plain"] == cited["transformers"] and cited["plain"]


def test_kvcli_ask_on_a_kvc_file_does_not_import_transformers(embedded, tmp_path):
    """What the start-up target rests on: neither transformers nor torch._dynamo in the process."""
    from kvcli.compress.methods import make_press
    from kvcli.documents import load_document
    from kvcli.store import persist

    document = load_document(str(ROOT / "samples" / "field_notes.txt"))
    path = tmp_path / "notes.kvc"
    persist.compress(embedded, document, make_press("kvzip", ratio=0.25), path)
    probe = (
        "import sys; from kvcli.cli.main import main\n"
        f"sys.argv = ['kvcli', 'ask', {str(path)!r}, 'Where was the station?', '--max-new-tokens', '4', '--quiet']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LOADED', 'transformers' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED False False" in out.stdout, out.stdout[-500:] + out.stderr[-1000:]
    record = json.loads(subprocess.run(
        [sys.executable, "-m", "kvcli.cli.main", "ask", str(path), "Where was the station?", "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
    ).stdout)
    assert record["model"]["decoder"] == "plain" and record["model"]["fingerprint"] == embedded.fingerprint
