"""A heavier cache selected from a lighter one held, by the scores it was compressed with,
instead of reading the document again (issue 17): kvcli.compress.pipeline.derive, the
server's placement moves (kvcli.serve.service) and the scores in .kvc files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvcli import api
from kvcli.compress.methods import make_press
from kvcli.compress.pipeline import derivable, derive
from kvcli.errors import KvcliError
from kvcli.models import LoadedModel
from kvcli.serve import service as service_module
from kvcli.serve.profiling import press_for
from kvcli.serve.requests import DocumentSource
from kvcli.store import persist
from kvcli.store.header import canonical_checksum
from kvcli.store.kvcfile import load_cache, read_header, save_cache
from tests.support import DOCUMENT, CharTokenizer, make_cache, make_header, split, tiny_llama, tiny_service, two_page_document


@pytest.fixture(scope="module")
def model():
    _, ours = tiny_llama(8, 2, layers=2)
    return LoadedModel(ours, CharTokenizer(), "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)


def assert_same_rows(a, b, *, exact=True):
    """The same kept rows per (layer, head): positions, keys, values (and the prompt around them)."""
    assert a.kept_per_head().tolist() == b.kept_per_head().tolist()
    assert a.original_length == b.original_length and a.next_position.tolist() == b.next_position.tolist()
    for la, lb in zip(a.layers, b.layers):
        for h in range(la.num_kv_heads):
            (ka, va, pa), (kb, vb, pb) = la.head_rows(0, h), lb.head_rows(0, h)
            assert torch.equal(pa, pb)
            if exact:
                assert torch.equal(ka, kb) and torch.equal(va, vb)
            else:
                torch.testing.assert_close(ka, kb, atol=0.05, rtol=0)
                torch.testing.assert_close(va, vb, atol=0.05, rtol=0)


def read(model, method, ratio, document=None):
    return api.read(model, document or two_page_document(), make_press(method, ratio=ratio), question=None)


# ---- derive: the selection itself ----------------------------------------------------------


@pytest.mark.parametrize(
    "method, lighter, heavier",
    [("kvzip", 0.5, 0.25), ("kvzip", 0.5, 0.1), ("kvzip", 0.25, 0.1), ("snapkv", 0.5, 0.2), ("pyramid", 0.6, 0.3), ("streaming", 0.5, 0.25)],
)
def test_derived_cache_is_what_reading_again_gives(model, method, lighter, heavier):
    held = read(model, method, lighter)
    fresh = read(model, method, heavier)
    assert held.cache.scores is not None
    target = make_press(method, ratio=heavier)
    derived = derive(held.cache, held.press, target, prefix=len(held.layout.prefix_ids), document_tokens=held.document_tokens)
    assert derived is not None
    assert derived.kept_per_head().sum() < held.cache.kept_per_head().sum()
    assert_same_rows(derived, fresh.cache)
    assert all(torch.equal(a, b) for a, b in zip(derived.scores, fresh.cache.scores))
    # the prefix rows, kept by every head, score +inf; the document rows their own score
    prefix = len(held.layout.prefix_ids)
    assert torch.isinf(derived.scores[0][:prefix]).all() and torch.isfinite(derived.scores[0][prefix : int(derived.layers[0].lengths[0, 0])]).all()


def test_derivations_chain(model):
    """0.5 -> 0.25 -> 0.1, each from the one before: still exactly the read at 0.1."""
    held = read(model, "kvzip", 0.5)
    prefix, tokens = len(held.layout.prefix_ids), held.document_tokens
    quarter = derive(held.cache, held.press, make_press("kvzip", ratio=0.25), prefix=prefix, document_tokens=tokens)
    tenth = derive(quarter, make_press("kvzip", ratio=0.25), make_press("kvzip", ratio=0.1), prefix=prefix, document_tokens=tokens)
    assert_same_rows(tenth, read(model, "kvzip", 0.1).cache)


def test_derive_refuses_what_it_cannot_give_exactly(model):
    held = read(model, "kvzip", 0.25)
    prefix, tokens = len(held.layout.prefix_ids), held.document_tokens

    def attempt(target, cache=held.cache, press=held.press):
        return derive(cache, press, target, prefix=prefix, document_tokens=tokens)

    assert attempt(make_press("kvzip", ratio=0.5)) is None  # lighter: rows it does not hold
    assert attempt(make_press("kvzip", ratio=1.0)) is None  # the whole document
    assert attempt(make_press("snapkv", ratio=0.1)) is None  # other scores
    no_scores = held.cache.clone()
    assert no_scores.scores is None and attempt(make_press("kvzip", ratio=0.1), cache=no_scores) is None
    # allocations that are not nested, and scores shaped by the budget, are read again
    for method in ("ada-snapkv", "ada-snapkv-topk", "dynamic", "criticalkv", "defensivekv"):
        assert not derivable(make_press(method, ratio=0.5), make_press(method, ratio=0.25)), method
    assert derivable(make_press("kvzip", ratio=0.5), make_press("kvzip", ratio=0.25))
    assert not derivable(make_press("full"), make_press("kvzip", ratio=0.25))
    # a full cache records no scores (nothing was scored)
    assert read(model, "full", None).cache.scores is None


def test_a_progressive_read_records_no_scores(model):
    """Read in chunks, later chunks attend to what earlier ones kept: its scores depend on the
    budget, so a subset would not be what reading again gives."""
    compressed = api.read(model, two_page_document(), make_press("kvzip", ratio=0.25), question=None, max_context=400, headroom_tokens=16)
    assert compressed.progressive is not None and compressed.cache.scores is None


# ---- the server: a move to a heavier configuration ---------------------------------------


class Counts:
    """Reads of a document and passes through the model (the embedding runs in every pass)."""

    def __init__(self, service, monkeypatch):
        self.reads = self.passes = 0
        original = api.read

        def counted(*args, **kwargs):
            self.reads += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(api, "read", counted)
        embedding = service.model.model.get_input_embeddings()
        handle = embedding.register_forward_hook(lambda *_: setattr(self, "passes", self.passes + 1))
        self.close = handle.remove


def placed(service, entry, config, tier):
    service.manager._move(entry, config, tier, "compress", "test: compress further")
    service.rebalance()
    assert (entry.config, entry.tier) == (config, tier)


def admitted(service):
    entry = service.entry_for(service.read_document(DocumentSource(text=DOCUMENT)))
    service.manager.access(entry.id)
    return entry


def fresh(service, config_index):
    config = service.manager.configs[config_index]
    return api.read(service.model, service.documents[next(iter(service.documents))], press_for(config), question=None)


def test_compressing_further_in_memory_calls_no_model(char_tokenizer, monkeypatch):
    service = tiny_service(char_tokenizer, cpu_bytes=10**9)
    entry = admitted(service)
    placed(service, entry, 1, "cpu")  # kvzip@0.5: read (a full cache has no scores)
    assert service.placement_work["read"] == 1
    counts = Counts(service, monkeypatch)
    placed(service, entry, 2, "cpu")  # kvzip@0.25, selected from the 0.5 cache held
    counts.close()
    assert (counts.reads, counts.passes) == (0, 0)
    assert service.placement_work == {"read": 1, "derived": 1, "loaded": 0, "profiled": 0}
    held = service.memory[entry.id][2]
    assert held.press.ratio == 0.25 and held.cache.scores is not None
    assert_same_rows(held.cache, fresh(service, 2).cache)


def test_compressing_further_on_disk_selects_from_the_file(char_tokenizer, monkeypatch):
    service = tiny_service(char_tokenizer)  # no memory tier: every cache is a .kvc file
    entry = admitted(service)
    placed(service, entry, 1, "disk")
    (first,) = service.store.glob("*.kvc")
    assert read_header(first).scores is not None  # the server's files carry their scores
    counts = Counts(service, monkeypatch)
    placed(service, entry, 2, "disk")
    (second,) = service.store.glob("*.kvc")
    assert first != second and not first.exists()
    placed(service, entry, 3, "disk")  # kvzip@0.25 as int8: the same rows, rounded (no read, as before)
    placed(service, entry, 4, "disk")  # kvzip@0.1 as int8: selected from the int8 file
    counts.close()
    assert (counts.reads, counts.passes) == (0, 0)
    assert service.placement_work["derived"] == 2 and service.placement_work["read"] == 1
    (last,) = service.store.glob("*.kvc")
    loaded, header = persist.load(service.model, last, scores=True)
    assert header.kv_dtype == "int8" and header.scores is not None and loaded.cache.scores is not None
    reference = fresh(service, 4)
    # the same rows; their int8 rounding is the same up to rounding the rounded rows again
    assert_same_rows(loaded.cache, service_module.quantized_copy(reference, "int8").cache, exact=False)


def test_scores_survive_a_restart(char_tokenizer, monkeypatch):
    service = tiny_service(char_tokenizer, cpu_bytes=10**9)
    entry = admitted(service)
    placed(service, entry, 1, "cpu")
    assert service.stop() == 1
    restarted = tiny_service(char_tokenizer, cpu_bytes=10**9)
    assert restarted.rediscover() == 1
    (entry,) = restarted.manager.entries.values()
    counts = Counts(restarted, monkeypatch)
    placed(restarted, entry, 2, "disk")
    counts.close()
    assert (counts.reads, counts.passes) == (0, 0) and restarted.placement_work["derived"] == 1


def test_without_scores_the_document_is_read_again(char_tokenizer, monkeypatch):
    """An older file (no scores) or a held copy without them: read again, as before."""
    service = tiny_service(char_tokenizer)
    written = []

    def save_without_scores(*args, scores=False, **kwargs):
        written.append(args[0])
        return save_cache(*args, **kwargs)

    monkeypatch.setattr(service_module, "save_cache", save_without_scores)
    entry = admitted(service)
    placed(service, entry, 1, "disk")
    assert read_header(written[-1]).scores is None
    counts = Counts(service, monkeypatch)
    placed(service, entry, 2, "disk")
    assert counts.reads == 1 and counts.passes > 0 and service.placement_work["derived"] == 0
    counts.close()

    memory = tiny_service(char_tokenizer, cpu_bytes=10**9)
    entry = admitted(memory)
    placed(memory, entry, 1, "cpu")
    memory.memory[entry.id][2].cache.scores = None
    counts = Counts(memory, monkeypatch)
    placed(memory, entry, 2, "cpu")
    assert counts.reads == 1 and memory.placement_work == {"read": 2, "derived": 0, "loaded": 0, "profiled": 0}
    counts.close()


# ---- scores in .kvc files ------------------------------------------------------------------


def scored_cache():
    cache = make_cache()
    gen = torch.Generator().manual_seed(1)
    cache.scores = [torch.rand(int(layer.lengths[0].sum()), generator=gen) for layer in cache.layers]
    cache.scores[0][:2] = float("inf")
    return cache


def test_scores_are_written_only_when_asked_and_read_back(tmp_path):
    cache = scored_cache()
    plain, scored = tmp_path / "plain.kvc", tmp_path / "scored.kvc"
    save_cache(plain, cache, make_header())
    save_cache(scored, cache, make_header(), scores=True)
    assert read_header(plain).scores is None  # what every kvcli reads; `kvcli compress` writes these
    assert read_header(scored).scores.dtype == "fp32"
    loaded, _ = load_cache(scored)  # the loader accepts (and checks) the optional tensors
    assert loaded.kept_per_head().tolist() == cache.kept_per_head().tolist() and loaded.scores is None
    back, _ = load_cache(scored, scores=True)
    assert all(torch.equal(a, b) for a, b in zip(back.scores, cache.scores))
    assert load_cache(plain, scores=True)[0].scores is None
    # a flipped byte in the scores is the file's checksum mismatch, like any other
    data = bytearray(scored.read_bytes())
    table, _, body = split(bytes(data))
    begin = table["layer.1.scores"]["data_offsets"][0]
    data[len(data) - len(body) + begin] ^= 0x01
    scored.write_bytes(bytes(data))
    with pytest.raises(KvcliError, match=r"checksum mismatch"):
        load_cache(scored, scores=True)
    # scores that no longer match the rows (a cache decoded into) are not written
    cache.scores[1] = cache.scores[1][:-1]
    save_cache(plain, cache, make_header(), scores=True)
    assert read_header(plain).scores is None


def _rewritten(path, change_header, change_tensors):
    table, header, _ = split(path.read_bytes())
    tensors = st_load(path.read_bytes())
    change_header(header)
    change_tensors(tensors)
    header["header_checksum"] = canonical_checksum(header)
    path.write_bytes(st_save(tensors, metadata={"kvcli": json.dumps(header)}))


def test_the_tensor_table_must_match_the_header_scores(tmp_path):
    path = tmp_path / "c.kvc"
    save_cache(path, scored_cache(), make_header(), scores=True)
    _rewritten(path, lambda h: None, lambda t: t.pop("layer.1.scores"))
    with pytest.raises(KvcliError, match="missing tensor layer.1.scores"):
        load_cache(path)
    save_cache(path, scored_cache(), make_header(), scores=True)
    _rewritten(path, lambda h: h.pop("scores"), lambda t: None)
    with pytest.raises(KvcliError, match="unexpected tensor layer.0.scores"):
        load_cache(path)
    save_cache(path, scored_cache(), make_header(), scores=True)
    _rewritten(path, lambda h: None, lambda t: t.update({"layer.2.scores": t["layer.2.scores"].half()}))
    with pytest.raises(KvcliError, match="tensor layer.2.scores is F16"):
        load_cache(path)
    save_cache(path, scored_cache(), make_header(), scores=True)
    _rewritten(path, lambda h: h.update(scores={"dtype": "fp16"}), lambda t: None)
    with pytest.raises(KvcliError, match="scores.dtype must be fp32"):
        read_header(path)


# ---- the profiler ---------------------------------------------------------------------------


def test_passage_probes_quote_the_document_at_each_depth():
    """The profiler asks about passages deep inside as well as the opening: a generic
    question is answered from what any cache keeps, a passage only if it survived."""
    from kvcli.serve.profiling import passage_probes

    text = " ".join(f"w{i}" for i in range(100))
    probes = passage_probes(text, depths=(0.0, 0.5, 0.99))
    assert probes == [
        "What does the document say about w0 w1 w2 w3 w4 w5?",
        "What does the document say about w50 w51 w52 w53 w54 w55?",
        "What does the document say about w94 w95 w96 w97 w98 w99?",  # never past the end
    ]
    assert passage_probes("only four words here", depths=(0.0, 0.5)) == ["What does the document say about only four words here?"]
    assert passage_probes("") == []


def test_profiling_reads_each_method_once_and_selects_its_heavier_ratios(model, monkeypatch):
    """quality(c, x) of kvzip at 0.5, 0.25 and 0.1: one KVzip read (the lightest), the rest
    selected from it, with the same agreements as three reads."""
    from kvcli.compress.reading import Compressed
    from kvcli.serve.manager import Config
    from kvcli.serve.profiling import AgreementProfiler

    configs = [Config("full", 1.0), Config("kvzip", 0.1), Config("kvzip", 0.5), Config("kvzip", 0.25)]
    document = two_page_document()
    profiler = AgreementProfiler(model, configs, answer_tokens=6, probes=("What is this about?",))
    reads = []
    real_read = api.read
    monkeypatch.setattr(api, "read", lambda m, d, press, **k: reads.append(press.describe()) or real_read(m, d, press, **k))
    derived = profiler.per_question(document, ["What is the code?"], [1, 2, 3])
    assert [r["method"] for r in reads] == ["full", "kvzip"] and reads[1]["ratio"] == 0.5
    monkeypatch.setattr(Compressed, "derive", lambda self, press: None)  # every ratio read on its own
    reads.clear()
    assert profiler.per_question(document, ["What is the code?"], [1, 2, 3]) == derived
    assert [r["method"] for r in reads] == ["full", "kvzip", "kvzip", "kvzip"]


def test_a_cache_moved_between_devices_keeps_its_read_timings(model):
    """The GPU serve benchmark found every first read reporting prefill_seconds 0: the move to
    the tier's device dropped the read's record. The meta device stands in for another one."""
    compressed = read(model, "snapkv", 0.5)
    moved = service_module.to_device(compressed, torch.device("meta"))
    assert moved.cache.layers[0].keys.device.type == "meta"
    assert moved.prefill is not None and moved.prefill.prefill_seconds == compressed.prefill.prefill_seconds > 0
    assert moved.prefill.cache is moved.cache  # the old device's copy is not held through it
    assert moved.pages is compressed.pages and moved.document_tokens == compressed.document_tokens
    assert moved.kept.tolist() == compressed.kept.tolist()


def test_the_move_after_profiling_takes_the_profilers_read(char_tokenizer, monkeypatch):
    """Profiling reads the document at every method it measures; the placement right after
    it (full does not fit: compress) takes that read instead of reading the document again."""
    from kvcli.serve.service import ModelService

    plain_service = tiny_service(char_tokenizer, cpu_bytes=10**9)
    service = ModelService(plain_service.model, plain_service.manager, profile=True)
    entry = admitted(service)
    service.materialize(entry)  # the question's read: the full cache, now in memory
    assert service.placement_work["read"] == 1
    full = service.manager.size(entry, 0, "cpu")
    service.manager.tiers[0].capacity = int(0.6 * full)  # the full cache no longer fits
    service.manager.tiers[1].bandwidth = 1e3  # and loading from disk is slow: compressing is the move
    service.after_request()
    assert entry.profiled and entry.config != 0 and entry.tier == "cpu", (entry.config, entry.tier)
    assert service.placement_work["read"] == 1 and service.placement_work["profiled"] == 1
    assert not service._profiled_reads  # let go once placed
    held = service.memory[entry.id][2]
    assert_same_rows(held.cache, fresh(service, entry.config).cache)


def test_profiling_waits_while_other_requests_wait_for_the_model(char_tokenizer):
    """A new document's profiling (reads at every measured method) would hold the model for
    everyone queued behind it: it runs at the first reply with nobody waiting."""
    from kvcli.serve.service import ModelService

    plain_service = tiny_service(char_tokenizer, cpu_bytes=10**9)
    service = ModelService(plain_service.model, plain_service.manager, profile=True)
    entry = admitted(service)
    service.materialize(entry)
    service.reserve()  # the request holding the model
    service.reserve()  # and one waiting for it
    service.after_request()
    assert not entry.profiled
    service.release()  # the other one is served: nobody waits behind this reply
    service.after_request()
    assert entry.profiled
