"""Hostile .kvc files through the real command line (issue 14 Low-8): `info`, `ask` and
`cache list` answer in one line and exit 1 where they used to print a traceback."""

from __future__ import annotations

import pytest

from kvcli.store.kvcfile import save_cache
from tests.support import join, make_cache, make_header, run_kvcli, split


@pytest.fixture
def forged(tmp_path):
    """A file whose header lost document.tokens (checksum recomputed, as a forger would)."""
    path = tmp_path / "forged.kvc"
    save_cache(path, make_cache(), make_header())
    table, header, body = split(path.read_bytes())
    header.pop("header_checksum")
    del header["document"]["tokens"]
    path.write_bytes(join(table, header, body))
    return path


@pytest.mark.parametrize("args", [["info", "{path}"], ["ask", "{path}", "q"]], ids=["info", "ask"])
def test_bad_header_field_is_one_line_exit_1(forged, args, tmp_path):
    result = run_kvcli([a.format(path=forged) for a in args], {"KVCLI_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{forged} is corrupted: header field document.tokens is missing" in result.stderr


def test_cache_list_shows_a_bad_file_as_an_error(forged, tmp_path):
    cache = tmp_path / "cache"
    store = cache / "store"
    store.mkdir(parents=True)
    (store / ("b" * 32 + ".kvc")).write_bytes(forged.read_bytes())
    result = run_kvcli(["cache", "list", "--json"], {"KVCLI_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "header field document.tokens is missing" in result.stdout
