"""What was kept: the share of each page's tokens kept, in `info` and as a PNG map."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvcli import api, citations
from kvcli.cli.info import kept_map, write_kept_map
from kvcli.cli.main import app
from kvcli.compress.methods import make_press
from kvcli.documents import Document, PageSpan
from kvcli.models import LoadedModel
from kvcli.store import persist
from kvcli.store.kvcfile import save_cache
from tests.support import CharTokenizer, keep_pages, make_cache, make_header, text_of, tiny_llama

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    _, ours = tiny_llama(8, 2, layers=3)
    return LoadedModel(ours, CharTokenizer(), "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)


def three_pages() -> Document:
    parts = [text_of(120), "Violet boats in amber harbours. " * 4, text_of(90)[::-1]]
    text, spans, at = "", [], 0
    for page, part in enumerate(parts, 1):
        if text:
            text += "\n\n"
            at += 2
        spans.append(PageSpan(page, at, at + len(part)))
        text += part
        at += len(part)
    return Document("three.txt", text, "2" * 64, spans)


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "three.kvc"
    compressed, _ = persist.compress(model, three_pages(), make_press("snapkv", ratio=0.3), path)
    return path, compressed


def test_kept_share_per_page_counts_the_kept_rows(model):
    """Evict every document row of page 2: its share is 0, the others' are exact."""
    compressed = keep_pages(api.read(model, three_pages(), make_press("full"), question=None), {1, 3})
    doc_start = len(compressed.layout.prefix_ids)
    shares = citations.kept_per_page(compressed.cache, compressed.kept, compressed.pages, doc_start)
    assert shares["pages"] == [1, 2, 3]
    assert shares["kept_share"] == [1.0, 0.0, 1.0]
    assert shares["per_layer"] == [[1.0, 0.0, 1.0]] * len(compressed.cache.layers)


def test_info_reports_kept_share_per_page(saved):
    path, compressed = saved
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    shares = json.loads(result.stdout)["kept_per_page"]
    expected = compressed.kept_per_page()
    assert list(shares) == ["1", "2", "3"] and list(shares.values()) == expected["kept_share"]
    assert all(0 < s < 1 for s in shares.values())
    text = CliRunner().invoke(app, ["info", str(path)])
    assert "p. 1 " in text.stdout and "p. 3 " in text.stdout


def test_info_map_writes_a_png(saved, tmp_path):
    path, _ = saved
    out = tmp_path / "kept.png"
    result = CliRunner().invoke(app, ["info", str(path), "--map", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert json.loads(result.stdout)["map"] == {"file": str(out), "bytes": len(data), "pages": 3, "layers": 3}


def test_the_map_draws_what_the_file_kept(saved):
    path, compressed = saved
    drawn = kept_map(str(path))
    shares = citations.kept_per_page(compressed.cache, compressed.kept, compressed.pages, len(compressed.layout.prefix_ids))
    assert drawn["pages"] == [1, 2, 3] and drawn["per_layer"] == shares["per_layer"]
    # per head: document rows only (the prefix, always kept, is not the document's)
    prefix = len(compressed.layout.prefix_ids)
    assert drawn["per_head"] == (compressed.kept - prefix).tolist()


@pytest.mark.parametrize("args, message", [
    (["--map", "{dir}/kept.jpg"], "give a FILE.png"),
    (["--map", "{dir}/no/such/dir/kept.png"], "kept.png"),
])
def test_info_map_bad_output_is_one_line(saved, tmp_path, args, message):
    path, _ = saved
    result = CliRunner().invoke(app, ["info", str(path), *[a.format(dir=tmp_path) for a in args]])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_a_file_without_a_token_page_map_says_so(tmp_path):
    path = tmp_path / "old.kvc"
    save_cache(path, make_cache(), make_header())  # a header as older kvcli versions wrote it
    assert json.loads(CliRunner().invoke(app, ["info", str(path), "--json"]).stdout)["kept_per_page"] is None
    result = CliRunner().invoke(app, ["info", str(path), "--map", str(tmp_path / "kept.png")])
    assert result.exit_code == 1 and "no page map in tokens" in result.output
    assert not (tmp_path / "kept.png").exists()


def test_map_needs_a_kvc_file():
    result = CliRunner().invoke(app, ["info", "--map", "kept.png"])
    assert result.exit_code == 1 and "--map draws a .kvc file" in result.output


def test_write_kept_map_replaces_atomically(saved, tmp_path):
    path, _ = saved
    out = tmp_path / "kept.png"
    out.write_bytes(b"old")
    written = write_kept_map(str(path), str(out))
    assert out.read_bytes().startswith(PNG_SIGNATURE) and written["bytes"] == out.stat().st_size
