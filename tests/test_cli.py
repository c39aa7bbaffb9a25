"""The command line: in-process through Typer's runner, and as a real subprocess on the embedded model."""

import json

import pytest
from typer.testing import CliRunner

from kvcli.cli.main import app
from kvcli.compress.methods import DEFAULT_AWARE_METHOD
from tests.support import run_kvcli

SHORT_DOC = (
    "Greyhaven Lighthouse stands on the northern cape of Orrin Island. Its keeper from 1921 to 1948 "
    "was Tomas Elling. Elling kept a dog named Biscuit. In 1935 a new lens was installed at a cost of "
    "412 pounds.\n"
)
COMMANDS = [["ask"], ["summarize"], ["compress"], ["info"], ["cache"], ["cache", "list"], ["cache", "rm"], ["cache", "clear"], ["serve"], ["eval"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output.splitlines()) > 3


def test_usage_error_exits_2():
    result = run_kvcli(["ask"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["ask", "missing.txt", "q"], "no such file"),
        (["ask", "{doc}", "q", "--model", "no/such-model"], "unknown model"),
        (["ask", "{doc}", "q", "--method", "bogus"], "unknown method"),
        (["ask", "{doc}", "q", "--ratio", "1.5"], "--ratio"),
        (["ask", "{doc}", "q", "--model", "missing.gguf"], "no such GGUF file"),
        (["compress", "{doc}", "-o", "out.bin"], ".kvc"),
        (["ask", "{bad_kvc}", "q"], "not a kvcli cache"),
        (["info", "{bad_kvc}"], "not a kvcli cache"),
        (["cache", "rm", "../../etc"], "invalid cache id"),
        (["ask", "{doc}", "q", "--dtype", "float64"], "unknown --dtype 'float64'"),
        (["summarize", "{doc}", "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["compress", "{doc}", "-o", "{doc}.kvc", "--dtype", "double"], "unknown --dtype 'double'"),
        (["ask", "{bad_kvc}", "q", "--dtype", "bf17"], "unknown --dtype 'bf17'"),
    ],
)
def test_bad_input_is_one_line_exit_1(tmp_path, args, message):
    doc = tmp_path / "doc.txt"
    doc.write_text(SHORT_DOC)
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(b"this is not a cache file at all, just some bytes" * 10)
    args = [a.format(doc=doc, bad_kvc=bad) for a in args]
    result = run_kvcli(args)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_bad_dtype_from_the_environment_is_one_line(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(SHORT_DOC)
    result = run_kvcli(["ask", str(doc), "q"], {"KVCLI_DTYPE": "float8"})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["kvcli: error: unknown --dtype 'float8': use auto, float32, bfloat16, float16"]


@pytest.mark.slow
def test_ask_end_to_end_on_the_embedded_model(tmp_path, model_cache_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(SHORT_DOC)
    env = {"KVCLI_CACHE_DIR": model_cache_dir}
    result = run_kvcli(["ask", str(doc), "What was the dog's name?", "--method", "full", "--max-new-tokens", "24"], env)
    assert result.returncode == 0, result.stderr
    assert "Biscuit" in result.stdout
    assert result.stderr == ""  # stderr is not a terminal: no progress noise

    result = run_kvcli(["ask", "-", "What was the dog's name?", "--json", "--max-new-tokens", "24", "--ratio", "0.5"], env, stdin=SHORT_DOC)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record) >= {"answer", "model", "document", "timings", "cache"}
    assert record["document"]["name"] == "<stdin>" and record["document"]["tokens"] > 40
    assert len(record["document"]["sha256"]) == 64
    assert set(record["timings"]) >= {"model_load_seconds", "prefill_seconds", "ttft_seconds", "decode_tokens_per_second"}
    cache = record["cache"]
    assert cache["method"] == DEFAULT_AWARE_METHOD and cache["ratio"] == 0.5  # question-aware: the aware default
    assert len(cache["kept_per_layer"]) == 30
    assert cache["compressed_bytes"] < cache["full_bytes"]
    assert cache["kept_per_head"]["min"] <= cache["kept_per_head"]["median"] <= cache["kept_per_head"]["max"]


@pytest.mark.slow
def test_compress_then_ask_many_from_the_file(tmp_path, model_cache_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(SHORT_DOC)
    kvc = tmp_path / "doc.kvc"
    env = {"KVCLI_CACHE_DIR": model_cache_dir}
    result = run_kvcli(["compress", str(doc), "-o", str(kvc), "--ratio", "0.6"], env)
    assert result.returncode == 0, result.stderr
    info = json.loads(run_kvcli(["info", str(kvc), "--json"], env).stdout)
    assert info["method"] == "kvzip" and info["document"] == "doc.txt" and len(info["kept_per_layer"]) == 30
    questions = "What was the dog's name?\nWho was the keeper?\n"
    result = run_kvcli(["ask", str(kvc), "--questions", "-", "--json", "--max-new-tokens", "24"], env, stdin=questions)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in lines] == questions.split("\n")[:2]
    assert "Biscuit" in lines[0]["answer"] and "Elling" in lines[1]["answer"]
