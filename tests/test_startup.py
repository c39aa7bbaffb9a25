"""Start-up: help and usage errors import neither torch nor transformers.

Each case runs in a fresh interpreter (the test process has long imported torch): the CLI
is built, asked for help or given a usage error, and the imported modules are reported.
"""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
from kvcli.cli.main import main
sys.argv = ["kvcli", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules)
sys.stderr.write("\nPROBE " + json.dumps({"code": code, "heavy": heavy}) + "\n")
"""


def probe(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stderr
    return {**json.loads(lines[-1][len("PROBE "):]), "stdout": result.stdout, "stderr": result.stderr}


HELP = [["--help"], ["ask", "--help"], ["summarize", "--help"], ["compress", "--help"], ["info", "--help"], ["cache", "list", "--help"],
        ["serve", "--help"], ["eval", "--help"]]
USAGE = [["ask"], ["ask", "doc.txt", "q", "--no-such-option"], ["compress"], ["bogus-command"], ["ask", "doc.txt", "q", "--ratio", "x"]]


@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_help_imports_no_torch(args):
    result = probe(args)
    assert result["code"] == 0 and "Usage" in result["stdout"]
    assert result["heavy"] == [], f"kvcli {' '.join(args)} imported {result['heavy']}"


@pytest.mark.parametrize("args", USAGE, ids=" ".join)
def test_usage_errors_import_no_torch(args):
    result = probe(args)
    assert result["code"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert result["heavy"] == [], f"kvcli {' '.join(args)} imported {result['heavy']}"


def test_the_dtype_option_is_on_the_reading_commands():
    for command in ("ask", "summarize", "compress"):
        result = probe([command, "--help"])
        assert "--dtype" in result["stdout"], command


# ---- the model loads fast, and the same ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.test_precision import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


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
