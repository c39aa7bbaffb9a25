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


# ---- a .kvc file described, or refused, before torch is imported ----------------------


def _saved_kvc(tmp_path, char_tokenizer) -> str:
    import torch

    from kvcli.compress.methods import make_press
    from kvcli.documents import load_document
    from kvcli.models import LoadedModel
    from kvcli.store import persist
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, 2, layers=2)
    model = LoadedModel(ours, char_tokenizer, "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)
    doc = tmp_path / "doc.txt"
    doc.write_text("The keeper was Tomas Elling. His dog was named Biscuit. " * 4)
    path = tmp_path / "doc.kvc"
    persist.compress(model, load_document(str(doc)), make_press("snapkv", ratio=0.5), path)
    return str(path)


def test_info_of_a_kvc_file_imports_no_torch(tmp_path, char_tokenizer):
    path = _saved_kvc(tmp_path, char_tokenizer)
    result = probe(["info", path, "--json"])
    assert result["code"] == 0, result["stderr"]
    assert json.loads(result["stdout"])["method"] == "snapkv"
    assert result["heavy"] == [], f"kvcli info FILE.kvc imported {result['heavy']}"


def test_a_damaged_kvc_is_refused_before_torch(tmp_path, char_tokenizer):
    path = _saved_kvc(tmp_path, char_tokenizer)
    with open(path, "r+b") as f:  # one flipped byte in the JSON header: its checksum fails
        data = bytearray(f.read())
        at = data.index(b"tiny")  # the model's name, inside the safetensors metadata
        data[at + 3] ^= 0x03  # tiny -> tinz
        f.seek(0)
        f.write(data)
    for args in (["info", path], ["ask", path, "Who?"]):
        result = probe(args)
        assert result["code"] == 1 and "Traceback" not in result["stderr"]
        assert path in result["stderr"] and result["stdout"] == ""
        assert result["heavy"] == [], f"kvcli {args[0]} DAMAGED.kvc imported {result['heavy']}"


def test_kvcfile_imports_no_torch_at_module_top():
    code = "import sys, kvcli.store.kvcfile, kvcli.cli.info; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
