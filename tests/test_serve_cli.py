"""`kvcli serve` and `--server URL` / KVCLI_SERVER on ask, compress and cache, in-process against a
server on a tiny random model (the real `kvcli serve` process is the slow test at the end)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvcli.cli.main import app
from kvcli.store.kvcfile import read_header
from tests.support import DOCUMENT


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOCUMENT)
    return path


def kvcli(*args, env=None, stdin=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, input=stdin)


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", [["serve"], ["ask"], ["compress"], ["cache", "list"], ["cache", "rm"], ["cache", "clear"]], ids=" ".join)
def test_help_mentions_the_server(command):
    result = kvcli(*command, "--help")
    assert result.exit_code == 0 and ("--server" in result.output or "--gpu-bytes" in result.output)


def test_ask_streams_through_the_server_then_reuses_its_cache(url, doc, service):
    first = kvcli("ask", doc, "Who counted?", "--server", url, "--reuse", "--max-new-tokens", "5")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip()
    second = kvcli("ask", doc, "Who counted?", "--reuse", "--max-new-tokens", "5", env={"KVCLI_SERVER": url})
    assert second.stdout == first.stdout
    (entry,) = service.manager.entries.values()
    assert entry.freq > 1  # the second call was served from the managed cache


def test_cache_list_shows_tier_configuration_size_utility_and_why(url, doc):
    kvcli("ask", doc, "Who counted?", "--server", url, "--reuse", "--max-new-tokens", "3")
    listing = kvcli("cache", "list", "--server", url)
    assert listing.exit_code == 0, listing.output
    header, row, why = listing.stdout.splitlines()
    assert all(word in header for word in ("tier", "configuration", "size", "utility"))
    assert " cpu " in row and "full@1/auto" in row and "MB" in row and "doc.txt" in row
    assert why.strip().startswith("why: admit doc.txt")
    (record,) = [json.loads(line) for line in kvcli("cache", "list", "--server", url, "--json").stdout.splitlines()]
    assert {"tier", "config", "bytes", "utility", "reason"} <= set(record)


def test_ask_json_and_questions_through_the_server(url, doc, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("Who counted?\nWhat was counted?\n")
    result = kvcli("ask", doc, "--questions", questions, "--json", "--server", url, "--max-new-tokens", "3", "--method", "snapkv")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == ["Who counted?", "What was counted?"]
    assert all(r["cache"]["method"] == "snapkv" and r["model"]["name"] == "tiny" for r in records)


def nested_keys(record: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in record.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= nested_keys(value, f"{prefix}{key}.")
    return keys


def test_ask_json_prints_the_same_record_with_and_without_the_server(url, doc, service, monkeypatch):
    """One answer record: `kvcli ask --json` on this machine and through the server (the same
    tiny model in both) print the same keys, nested ones too, and the same answers."""
    import kvcli.cli.main as cli_main

    monkeypatch.setattr(cli_main, "load_model_reporting", lambda *args, **kwargs: service.model)
    args = ["--json", "--method", "snapkv", "--ratio", "0.5", "--max-new-tokens", "3"]
    for extra, stdin in ((["Who counted?"], None), (["--questions", "-"], "Who counted?\nWhat was counted?\n")):
        local = kvcli("ask", doc, *extra, *args, stdin=stdin)
        remote = kvcli("ask", doc, *extra, *args, "--server", url, stdin=stdin)
        assert local.exit_code == 0 and remote.exit_code == 0, (local.output, remote.output)
        local_records = [json.loads(line) for line in local.stdout.splitlines()]
        remote_records = [json.loads(line) for line in remote.stdout.splitlines()]
        assert len(local_records) == len(remote_records) == (1 if stdin is None else 2)
        for mine, theirs in zip(local_records, remote_records):
            assert nested_keys(theirs) == nested_keys(mine)
            assert (theirs["question"], theirs["answer"], theirs["document"]) == (mine["question"], mine["answer"], mine["document"])


def test_summarize_through_the_server(url, doc):
    from kvcli.prompts import SUMMARY_INSTRUCTION

    result = kvcli("summarize", doc, "--server", url, "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["question"] == SUMMARY_INSTRUCTION and record["cache"]["agnostic"] is True
    streamed = kvcli("summarize", doc, "--max-new-tokens", "4", env={"KVCLI_SERVER": url})
    assert streamed.exit_code == 0 and streamed.stdout.strip() == record["answer"]


def test_more_questions_than_one_request_takes_go_in_several(url, doc):
    from kvcli.serve.client import QUESTIONS_PER_REQUEST
    from kvcli.serve.requests import MAX_QUESTIONS

    assert QUESTIONS_PER_REQUEST == MAX_QUESTIONS
    questions = "".join(f"Question {i}?\n" for i in range(MAX_QUESTIONS + 3))
    result = kvcli("ask", doc, "--questions", "-", "--json", "--server", url, "--max-new-tokens", "1", stdin=questions)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["question"] for line in result.stdout.splitlines()] == questions.splitlines()


def test_ask_reads_stdin_through_the_server(url):
    result = kvcli("ask", "-", "Who counted?", "--server", url, "--max-new-tokens", "3", "--json", stdin=DOCUMENT)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["document"]["name"] == "<stdin>"


def test_compress_through_the_server_writes_a_file_or_adds_a_managed_cache(url, doc, tmp_path, service):
    out = tmp_path / "doc.kvc"
    result = kvcli("compress", doc, "-o", out, "--server", url, "--ratio", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out) and read_header(out).method.ratio == 0.5
    added = kvcli("compress", doc, "--server", url, "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["entry"]["document"] == "doc.txt"
    assert len(service.manager.entries) == 1
    answer = kvcli("ask", out, "Who counted?", "--server", url, "--max-new-tokens", "3", "--json")
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)["timings"]["cache_file"] == str(out)


def test_cache_rm_and_clear_through_the_server(url, doc, service):
    kvcli("ask", doc, "Who counted?", "--server", url, "--reuse", "--max-new-tokens", "3")
    (entry_id,) = service.manager.entries
    one_line_error(kvcli("cache", "rm", "../../etc/passwd", "--server", url), "hexadecimal")
    one_line_error(kvcli("cache", "rm", "0123abc", "--server", url), "no cache with id")
    removed = kvcli("cache", "rm", entry_id[:10], "--server", url)
    assert removed.exit_code == 0 and removed.stdout == f"removed {entry_id}\n"
    kvcli("ask", doc, "Who counted?", "--server", url, "--reuse", "--max-new-tokens", "3")
    cleared = kvcli("cache", "clear", "--server", url)
    assert cleared.stdout == "removed 1 cache(s)\n" and not service.manager.entries


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["ask", "{doc}", "q", "--server", "http://127.0.0.1:9"], "cannot reach the kvcli server"),
        (["ask", "{doc}", "q", "--server", "ftp://x"], "use http://HOST:PORT or unix:///"),
        (["cache", "list", "--server", "unix:///nonexistent/kvcli.sock"], "cannot reach"),
        (["ask", "/no/such/file.txt", "q", "--server", "{url}"], "file.txt"),
        (["ask", "{doc}", "q", "--server", "{url}", "--temperature", "-1"], "--temperature"),
        (["compress", "{doc}"], "--output"),
        (["serve", "--gpu-bytes", "lots"], "--gpu-bytes 'lots'"),
        (["serve", "--host", "8.8.8.8"], "not a loopback address"),
        (["serve", "--socket", "/nonexistent/dir/kvcli.sock"], "does not exist"),
        (["serve", "--socket", "/tmp/" + "s" * 120], "longer than the 107 bytes"),
        (["summarize", "{doc}", "--server", "http://127.0.0.1:9"], "cannot reach the kvcli server"),
    ],
    ids=["server-down", "bad-scheme", "socket-missing", "missing-document", "bad-temperature", "compress-no-output", "bad-size",
         "remote-host", "serve-socket-folder-missing", "serve-socket-too-long", "summarize-server-down"],
)
def test_bad_input_is_one_line_and_exit_1(args, fragment, url, doc):
    one_line_error(kvcli(*[a.format(doc=doc, url=url) for a in args]), fragment)


@pytest.mark.slow
def test_kvcli_serve_process_answers_stops_cleanly_and_restarts_with_its_disk_tier(tmp_path, doc, model_cache_dir):
    """The real command on the embedded model: a Unix socket, SIGTERM, a restart."""
    from kvcli.serve.client import Client

    socket_path = tmp_path / "kvcli.sock"
    env = {**os.environ, "KVCLI_CACHE_DIR": model_cache_dir}
    socket_url = f"unix://{socket_path}"

    def serve():
        proc = subprocess.Popen([sys.executable, "-m", "kvcli.cli.main", "serve", "--socket", str(socket_path), "--cpu-bytes", "1G"],
                                stderr=subprocess.PIPE, text=True, env=env)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                return proc, lines
        raise AssertionError("".join(lines))

    def stop(proc):
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, rest
        return rest

    ask = [sys.executable, "-m", "kvcli.cli.main", "ask", str(doc), "Who counted?", "--reuse", "--json", "--max-new-tokens", "8", "--server", socket_url]
    body = {"document": str(doc), "question": "Who counted?", "max_new_tokens": 8}
    proc, lines = serve()
    try:
        first = json.loads(subprocess.run(ask, capture_output=True, text=True, env=env, check=True).stdout)
        assert Client(socket_url).ask(body)["placement"]["served_from"] == "cpu"  # the CLI's ask read it
        assert "1 cached document(s) on disk" in stop(proc)
    finally:
        proc.kill()
    proc, lines = serve()
    try:
        assert any("1 cached document(s) found on disk" in line for line in lines)
        again = Client(socket_url).ask(body)
        assert again["placement"]["served_from"] == "disk" and again["answer"] == first["answer"]
        stop(proc)
    finally:
        proc.kill()


def test_one_server_per_cache_store(tmp_path):
    from kvcli.cli.serve import _claim_store
    from kvcli.errors import KvcliError

    first = _claim_store(tmp_path)
    with pytest.raises(KvcliError, match="another `kvcli serve`"):
        _claim_store(tmp_path)
    first.close()
    _claim_store(tmp_path).close()
