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
