"""The typed .kvc header (issue 12): one class reads, checks and writes it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvcli.errors import KvcliError
from kvcli.store.header import (
    DocumentInfo,
    KvcHeader,
    MethodInfo,
    ModelInfo,
    canonical_checksum,
)
from kvcli.store.kvcfile import read_header, save_cache
from tests.support import make_cache, make_header, split


def test_the_file_json_round_trips_through_the_typed_header(tmp_path):
    """Everything a file holds comes back: as_dict() is the file's JSON less header_checksum,
    and to_json() reproduces a checksum the reader accepts."""
    path = tmp_path / "c.kvc"
    header = {**make_header(), "manager": {"config": "kvzip@0.25", "quality": {"kvzip@0.25": 0.9}}, "stats": {"kept": [1, 2]}}
    save_cache(path, make_cache(), header)
    raw = split(path.read_bytes())[1]
    typed = read_header(path)
    assert typed.as_dict() == {k: v for k, v in raw.items() if k != "header_checksum"}
    assert KvcHeader.parse(typed.to_json(), "again") == typed
    assert json.loads(typed.to_json())["header_checksum"] == raw["header_checksum"]
    assert typed.manager == header["manager"] and typed.stats == {"kept": [1, 2]}
    assert isinstance(typed.model, ModelInfo) and isinstance(typed.document, DocumentInfo) and isinstance(typed.method, MethodInfo)
    assert typed.bits is None and typed.num_kv_heads == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.kv_dtype = "int8"


def test_a_bare_cache_has_no_content_sections(tmp_path):
    path = tmp_path / "bare.kvc"
    save_cache(path, make_cache(), {"benchmark": "load_speed"})
    typed = read_header(path)
    assert typed.model is typed.document is typed.method is typed.prefix_ids is None
    assert typed.extra == {"benchmark": "load_speed"}
    with pytest.raises(KvcliError, match=r"^x is not a document cache \(its header has no model\)"):
        typed.require_document("x")


@pytest.mark.parametrize(
    "content,expected",
    [
        ({"model": {"name": "m"}}, "header field model.fingerprint is missing"),
        ({"document": {"name": "d", "sha256": "0", "pages": [[1, 0]], "tokens": 3}}, "document.pages must be a list"),
        ({"stats": {"x": float("nan")}}, "not plain JSON"),
        ({"stats": {"x": object()}}, "not plain JSON"),
        ({"method": {"method": "snapkv", "ratio": 2.0}}, "method.ratio must be in (0, 1]"),
    ],
)
def test_nothing_is_written_that_could_not_be_read_back(tmp_path, content, expected):
    """The writer checks the header as the reader will, so a bad caller header fails the
    save (leaving nothing), instead of writing a file every later load refuses."""
    path = tmp_path / "c.kvc"
    with pytest.raises(KvcliError) as e:
        save_cache(path, make_cache(), content)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_fields_the_module_adds_win_over_the_callers(tmp_path):
    path = tmp_path / "c.kvc"
    save_cache(path, make_cache(), {**make_header(), "num_layers": 99, "checksum": "0" * 64, "format_version": 7})
    typed = read_header(path)
    assert typed.num_layers == 3 and typed.format_version == 2 and typed.checksum != "0" * 64


def test_canonical_checksum_ignores_only_itself():
    body = {"a": 1, "b": [1, 2]}
    assert canonical_checksum(body) == canonical_checksum({**body, "header_checksum": "x"})
    assert canonical_checksum(body) != canonical_checksum({**body, "a": 2})
