"""Compress / load / --reuse against a tiny random model: the checks made before a stored
file is trusted (issue 14 items 7 and 8), and the private store (item 1's storage half)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from kvcli.compress.methods import make_press
from kvcli.documents import Document, PageSpan
from kvcli.errors import KvcliError
from kvcli.store import persist
from kvcli.store.header import KvcHeader
from kvcli.store.kvcfile import read_header, save_cache
from tests.support import join, make_cache, make_header, split

TEXT = "The lighthouse keeper counted ships every night and wrote their names down. " * 4


def tiny_model(char_tokenizer, layers=2, kv_heads=2, fingerprint="f" * 64):
    from kvcli.models import LoadedModel
    from tests.support import tiny_llama

    _, ours = tiny_llama(8, kv_heads, layers=layers)
    return LoadedModel(ours, char_tokenizer, "tiny", fingerprint, torch.device("cpu"), torch.float32, 4096, 0.0)


def document(text: str = TEXT, name: str = "notes.txt") -> Document:
    import hashlib

    return Document(name, text, hashlib.sha256(text.encode()).hexdigest(), [PageSpan(1, 0, len(text))])


@pytest.fixture
def model(char_tokenizer):
    return tiny_model(char_tokenizer)


def test_load_refuses_other_shapes_before_answering(model, char_tokenizer, tmp_path):
    """Same fingerprint (a renamed or edited file), other shapes: this used to load and then
    fail in the middle of an answer."""
    press = make_press("snapkv", ratio=0.5)
    path = tmp_path / "doc.kvc"
    persist.compress(model, document(), press, path)
    compressed, header = persist.load(model, path)
    assert isinstance(header, KvcHeader) and header.document.sha256 == document().sha256
    assert compressed.document_tokens == header.document.tokens
    for other in (tiny_model(char_tokenizer, layers=3), tiny_model(char_tokenizer, kv_heads=4)):
        with pytest.raises(KvcliError) as e:
            persist.load(other, path)
        assert "the current model has" in str(e.value) and "compress the document again" in str(e.value)


def test_load_refuses_a_bare_cache(model, tmp_path):
    """A cache with no document in its header (a benchmark's) is refused in one line, never a KeyError."""
    path = tmp_path / "bare.kvc"
    bare = {"model": {"name": "tiny", "fingerprint": "f" * 64, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16}}
    layers, heads, dim = 2, 2, 16
    save_cache(path, make_cache(num_layers=layers, num_heads=heads, head_dim=dim), bare)
    with pytest.raises(KvcliError, match=r"is not a document cache \(its header has no document\)"):
        persist.load(model, path)


def test_reuse_rejects_a_planted_cache_for_another_document(model, tmp_path):
    """A file at the store key is no longer trusted for its name: a cache of another document
    planted there (or a stale one) is refused, the document compressed again, and the caller
    gets a warning to show (nothing is printed)."""
    press = make_press("snapkv", ratio=0.5)
    wanted, other = document(), document("A completely different text about tax law. " * 6, "tax.txt")
    key_path = persist.store_dir() / f"{persist.store_key(model, wanted, press, 'auto')}.kvc"
    persist.ensure_store_dir()
    persist.compress(model, other, press, key_path)  # the planted file: valid, right model, wrong document
    assert read_header(key_path).document.sha256 == other.sha256

    compressed, hit, warning = persist.reuse(model, wanted, press)
    assert not hit
    assert warning and "holds another document (tax.txt" in warning and "\n" not in warning
    assert read_header(key_path).document.sha256 == wanted.sha256  # replaced by the right one
    again, hit, warning = persist.reuse(model, wanted, press)
    assert hit and warning is None
    assert again.kept.tolist() == compressed.kept.tolist()


def test_reuse_rejects_a_cache_of_another_method(model):
    press, other = make_press("snapkv", ratio=0.5), make_press("snapkv", ratio=0.25)
    doc = document()
    key_path = persist.store_dir() / f"{persist.store_key(model, doc, press, 'auto')}.kvc"
    persist.ensure_store_dir()
    persist.compress(model, doc, other, key_path)
    _, hit, warning = persist.reuse(model, doc, press)
    assert not hit and "was compressed with snapkv (ratio 0.25" in warning
    assert read_header(key_path).method.ratio == 0.5


def test_reuse_replaces_a_corrupt_file_with_a_warning(model):
    press, doc = make_press("snapkv", ratio=0.5), document()
    _, hit, warning = persist.reuse(model, doc, press)
    assert not hit and warning is None
    (path,) = persist.store_dir().glob("*.kvc")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    _, hit, warning = persist.reuse(model, doc, press)
    assert not hit and "checksum mismatch" in warning
    _, hit, warning = persist.reuse(model, doc, press)
    assert hit and warning is None


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_store_is_private(model, umask_022):
    """Store directory 0700 and its files 0600 under the common umask 022 (0755/0644 before):
    a cache holds its document's content."""
    persist.reuse(model, document(), make_press("snapkv", ratio=0.5))
    (path,) = persist.store_dir().glob("*.kvc")
    assert stat.S_IMODE(persist.store_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_older_wider_store_is_tightened():
    store = persist.store_dir()
    store.mkdir(parents=True, mode=0o755)
    store.chmod(0o755)
    persist.ensure_store_dir()
    assert stat.S_IMODE(store.stat().st_mode) == 0o700


def test_cache_list_and_info_on_bad_headers(tmp_path):
    """`cache list` and `info FILE.kvc` on headers with missing or mistyped fields: one line each
    (KeyError / TypeError tracebacks before)."""
    from kvcli.cli.info import cache_file_info

    store = persist.ensure_store_dir()
    good = store / ("a" * 32 + ".kvc")
    save_cache(good, make_cache(), make_header())
    table, header, body = split(good.read_bytes())
    header.pop("header_checksum")
    for i, change in enumerate([lambda h: h["document"].pop("tokens"), lambda h: h.update(method=None), lambda h: h["model"].update(name=7)]):
        h = json.loads(json.dumps(header))
        change(h)
        (store / f"{i:032x}.kvc").write_bytes(join(table, h, body))
    entries = {e["id"]: e for e in persist.store_entries()}
    assert entries["a" * 32]["document"] == "doc.pdf" and "error" not in entries["a" * 32]
    errors = [entries[f"{i:032x}"]["error"] for i in range(3)]
    assert "document.tokens is missing" in errors[0]
    assert "is not a document cache (its header has no method)" in errors[1]
    assert "model.name must be a string" in errors[2]
    assert all("\n" not in e for e in errors)
    info = cache_file_info(str(good))
    assert info["document"] == "doc.pdf" and info["method"] == "snapkv" and info["document_tokens"] == 40
    assert info["kept_per_layer"] == [sum(layer) - 7 * len(layer) for layer in read_header(good).lengths]
    for i in range(3):
        with pytest.raises(KvcliError):
            cache_file_info(str(store / f"{i:032x}.kvc"))
