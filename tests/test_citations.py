"""Page citations: the attention pass is exact, the ranking follows it, and citations
survive a .kvc file, the command line and the server."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvcli import api, citations
from kvcli.cli.main import app
from kvcli.compress.methods import make_press
from kvcli.documents import Document, PageSpan
from kvcli.errors import KvcliError
from kvcli.models import LoadedModel
from kvcli.serve.client import Client, remote_ask
from kvcli.store import persist
from kvcli.store.header import DocumentInfo, _Bad
from tests.support import CharTokenizer, keep_pages, text_of, tiny_llama

PAGE_ONE = text_of(150)
PAGE_TWO = "Quiet harbours hold violet boats and amber nets. " * 3
GENERATION = api.Generation(max_new_tokens=4)


def two_pages() -> Document:
    text = PAGE_ONE + "\n\n" + PAGE_TWO
    return Document("two.txt", text, "1" * 64, [PageSpan(1, 0, len(PAGE_ONE)), PageSpan(2, len(PAGE_ONE) + 2, len(text))])


@pytest.fixture(scope="module")
def models():
    reference, ours = tiny_llama(8, 2, layers=3)
    loaded = LoadedModel(ours, CharTokenizer(), "tiny", "f" * 64, torch.device("cpu"), torch.float32, 4096, 0.0)
    return reference, loaded


def test_token_pages_follow_the_character_pages():
    doc = two_pages()
    pages = citations.TokenPages.of_document(CharTokenizer(), doc, CharTokenizer()(doc.text)["input_ids"])
    # one token per character: the separator belongs to the page before it (Document.page_of)
    assert pages.spans == [(1, 0, len(PAGE_ONE) + 2), (2, len(PAGE_ONE) + 2, len(doc.text))]
    assert pages.page_index()[len(PAGE_ONE) + 1] == 1 and pages.page_index()[len(PAGE_ONE) + 2] == 2
    assert pages.page_tokens() == {1: len(PAGE_ONE) + 2, 2: len(PAGE_TWO)}


def test_attention_pass_matches_transformers_attention(models):
    """mass and copy are exactly what transformers' eager attention gives over the same tokens."""
    reference, model = models
    doc = two_pages()
    compressed = api.read(model, doc, make_press("full"), question=None)
    question = compressed.layout.question_part("Which boats?")
    produced = CharTokenizer()("violet boats")["input_ids"]
    run = question + produced[:-1]
    paid = citations.attention_to_document(model.model, compressed.cache.clone(), compressed.kept, run, [0] * (len(question) - 1) + produced,
                                           len(compressed.layout.prefix_ids), compressed.pages)

    reference.config._attn_implementation = "eager"
    ids = compressed.layout.prefix_ids + compressed.layout.document_ids + run
    with torch.no_grad():
        probs = torch.stack(reference(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]  # [L, H, S, S]
    start, stop = compressed.layout.document_range
    steps = probs[:, :, -len(run):, start:stop].double()  # [L, H, n, doc]
    weight = steps.shape[0] * steps.shape[1] * steps.shape[2]
    torch.testing.assert_close(paid.mass, steps.sum((0, 1, 2)) / weight, atol=1e-6, rtol=1e-4)
    tokens = torch.tensor(compressed.layout.document_ids)
    targets = torch.tensor([0] * (len(question) - 1) + produced)
    holds = (tokens.unsqueeze(0) == targets.unsqueeze(1)).double()  # [n, doc]
    rarity = 1.0 / holds.sum(1).clamp(min=1)
    expected = (steps.sum((0, 1)) * holds * rarity.unsqueeze(1)).sum(0) / weight
    torch.testing.assert_close(paid.copy, expected, atol=1e-6, rtol=1e-4)
    assert paid.copy.sum() > 0


@pytest.mark.parametrize("question_aware", [False, True], ids=["agnostic", "aware"])
def test_answer_cites_from_the_attention_that_produced_it(models, monkeypatch, question_aware):
    """api.answer(cite=True) runs the pass over the prompt as decoding saw it: its page
    shares are transformers' eager attention over prompt + answer, recomputed here."""
    reference, model = models
    doc = two_pages()
    compressed = api.read(model, doc, make_press("full"), question="Which boats?" if question_aware else None)
    seen = {}
    real_cite, real_rank = api._cite, citations.rank
    monkeypatch.setattr(api, "_cite", lambda model, compressed, view, run, produced: seen.update(run=run, produced=produced) or real_cite(model, compressed, view, run, produced))
    monkeypatch.setattr(citations, "rank", lambda paid, pages, tokenizer: seen.update(paid=paid) or real_rank(paid, pages, tokenizer))
    (answer,) = api.answer(model, compressed, ["Which boats?"], api.Generation(max_new_tokens=6), cite=True)

    question = compressed.layout.question_part("Which boats?")
    assert seen["run"] == [question[-1], *seen["produced"][:-1]] and len(seen["produced"]) == answer.tokens
    reference.config._attn_implementation = "eager"
    layout = compressed.layout
    ids = layout.prefix_ids + layout.document_ids + question + seen["produced"][:-1]
    with torch.no_grad():
        probs = torch.stack(reference(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].double()
    start, stop = layout.document_range
    steps = probs[:, :, -len(seen["run"]):, start:stop].sum((0, 1))  # [n, doc]
    tokens = torch.tensor(layout.document_ids)
    holds = (tokens.unsqueeze(0) == torch.tensor(seen["produced"]).unsqueeze(1)).double()
    copy = (steps * holds / holds.sum(1, keepdim=True).clamp(min=1)).sum(0)
    weight = probs.shape[0] * probs.shape[1] * len(seen["run"])
    torch.testing.assert_close(seen["paid"].mass, steps.sum(0) / weight, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(seen["paid"].copy, copy / weight, atol=1e-7, rtol=1e-4)
    score = copy if copy.sum() > 0 else steps.sum(0)
    page_of = compressed.pages.page_index()
    expected = {page: float(score[page_of == page].sum() / score.sum()) for page in (1, 2)}
    assert answer.citations
    for c in answer.citations:
        assert c.share == pytest.approx(expected[c.page], abs=1e-4)


@pytest.mark.parametrize("page", [1, 2])
def test_an_answer_cites_the_only_page_it_can_attend_to(models, page):
    _, model = models
    compressed = keep_pages(api.read(model, two_pages(), make_press("full"), question=None), {page})
    (answer,) = api.answer(model, compressed, ["Which boats?"], GENERATION, cite=True)
    assert [c.page for c in answer.citations] == [page]
    assert answer.citations[0].share == pytest.approx(1.0)


def test_question_aware_and_agnostic_caches_cite_alike(models):
    """Nothing evicted, the two paths hold the same rows: the citation pass (which re-runs
    the last prompt token over the decoded cache) must give the same pages and shares."""
    _, model = models
    doc = two_pages()
    (aware,) = api.answer(model, api.read(model, doc, make_press("full"), question="Which boats?"), ["Which boats?"], GENERATION, cite=True)
    (agnostic,) = api.answer(model, api.read(model, doc, make_press("full"), question=None), ["Which boats?"], GENERATION, cite=True)
    assert aware.answer == agnostic.answer
    assert [c.page for c in aware.citations] == [c.page for c in agnostic.citations]
    assert [c.share for c in aware.citations] == pytest.approx([c.share for c in agnostic.citations], rel=1e-4)


def test_cite_false_adds_nothing_and_leaves_the_answer_alone(models):
    _, model = models
    compressed = api.read(model, two_pages(), make_press("snapkv", ratio=0.5), question=None)
    plain, cited = api.answer(model, compressed, ["Which boats?", "Which boats?"], GENERATION)[0], api.answer(model, compressed, ["Which boats?"], GENERATION, cite=True)[0]
    assert plain.citations is None and cited.answer == plain.answer
    assert cited.citations and all(c.page in (1, 2) for c in cited.citations)


def spans_pages(tokens: int = 30) -> citations.TokenPages:
    return citations.TokenPages(list(range(1, tokens + 1)), [(1, 0, 10), (2, 10, 20), (3, 20, tokens)])


def test_ranking_cites_the_top_page_then_pages_with_half_its_score():
    pages = spans_pages()
    copy = torch.zeros(30, dtype=torch.float64)
    copy[25], copy[5], copy[15] = 1.0, 0.6, 0.4  # page 3 first, page 1 at 60% of it, page 2 at 40%
    cited = citations.rank(citations.Attention(mass=torch.ones(30, dtype=torch.float64), copy=copy), pages, CharTokenizer())
    assert [c.page for c in cited] == [3, 1]
    assert cited[0].share == pytest.approx(0.5) and cited[1].share == pytest.approx(0.3)
    # the snippet is centred on the most attended token: CharTokenizer decodes id i as chr(96 + i % 26)
    assert CharTokenizer().decode([26]) in cited[0].snippet
    assert citations.format_pages(cited) == "(p. 3, p. 1)"


def test_ranking_falls_back_to_all_attention_without_copies():
    mass = torch.zeros(30, dtype=torch.float64)
    mass[12] = 1.0
    cited = citations.rank(citations.Attention(mass=mass, copy=torch.zeros(30, dtype=torch.float64)), spans_pages(), CharTokenizer())
    assert [c.page for c in cited] == [2]


def test_document_header_checks_the_token_page_map():
    base = {"name": "d", "sha256": "0" * 64, "pages": [[1, 0, 9]], "tokens": 10}
    parsed = DocumentInfo.parse({**base, "token_pages": [[1, 0, 4], [2, 4, 10]], "token_ids": list(range(10))})
    assert parsed.token_pages == ((1, 0, 4), (2, 4, 10)) and DocumentInfo.parse(parsed.as_dict()) == parsed
    assert DocumentInfo.parse(base).token_pages is None  # files from before the map still read
    for bad in ({"token_pages": [[1, 0, 4], [2, 5, 10]]}, {"token_pages": [[1, 0, 9]]}, {"token_ids": [1, 2]}):
        with pytest.raises(_Bad):
            DocumentInfo.parse({**base, **bad})


def test_kvc_round_trip_keeps_the_page_map_and_the_citations(models, tmp_path):
    _, model = models
    doc = two_pages()
    fresh, _ = persist.compress(model, doc, make_press("snapkv", ratio=0.5), tmp_path / "two.kvc")
    loaded, header = persist.load(model, tmp_path / "two.kvc")
    assert header.document.token_pages == tuple(tuple(s) for s in fresh.pages.spans)
    assert list(header.document.token_ids) == fresh.layout.document_ids
    assert loaded.pages.spans == fresh.pages.spans
    (from_file,) = api.answer(model, loaded, ["Which boats?"], GENERATION, cite=True)
    (from_read,) = api.answer(model, fresh, ["Which boats?"], GENERATION, cite=True)
    assert from_file.answer == from_read.answer
    assert [(c.page, c.snippet) for c in from_file.citations] == [(c.page, c.snippet) for c in from_read.citations]
    assert [c.share for c in from_file.citations] == pytest.approx([c.share for c in from_read.citations], rel=1e-5)


def test_a_cache_without_a_page_map_cannot_cite(models):
    _, model = models
    compressed = api.read(model, two_pages(), make_press("full"), question=None)
    compressed.pages = None  # what an older .kvc file loads as
    with pytest.raises(KvcliError, match="no page map"):
        api.answer(model, compressed, ["q"], GENERATION, cite=True)


@pytest.fixture
def tiny_cli(models, monkeypatch, tmp_path):
    """The command line on the tiny model (no embedded model load)."""
    _, model = models
    monkeypatch.setattr("kvcli.cli.main.load_model_reporting", lambda *args, **kwargs: model)
    path = tmp_path / "two.txt"
    path.write_text(two_pages().text)
    return path


def test_ask_cite_ends_the_text_with_pages(tiny_cli):
    result = CliRunner().invoke(app, ["ask", str(tiny_cli), "Which boats?", "--cite", "--max-new-tokens", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    assert line.endswith(")") and " (p. " in line
    plain = CliRunner().invoke(app, ["ask", str(tiny_cli), "Which boats?", "--max-new-tokens", "4", "--quiet"])
    assert "(p. " not in plain.stdout


def test_ask_json_has_citations_and_kept_share_per_page(tiny_cli, tmp_path):
    result = CliRunner().invoke(app, ["ask", str(tiny_cli), "Which boats?", "--cite", "--json", "--max-new-tokens", "4", "--ratio", "0.5"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["citations"] and {"page", "share", "snippet"} <= set(record["citations"][0])
    shares = record["kept_per_page"]  # a text file is one page
    assert shares["pages"] == [1] and shares["tokens"] == [record["document"]["tokens"]]
    assert shares["kept_share"][0] == pytest.approx(record["cache"]["kept_fraction"], abs=1e-3)
    assert "citations" not in json.loads(CliRunner().invoke(app, ["ask", str(tiny_cli), "q", "--json", "--max-new-tokens", "2"]).stdout)


def test_ask_cite_from_a_kvc_file(tiny_cli, tmp_path):
    out = tmp_path / "two.kvc"
    assert CliRunner().invoke(app, ["compress", str(tiny_cli), "-o", str(out), "--ratio", "0.5", "--quiet"]).exit_code == 0
    result = CliRunner().invoke(app, ["ask", str(out), "Which boats?", "--cite", "--json", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["citations"]


def test_the_server_cites_when_asked(url, tmp_path):
    path = tmp_path / "two.txt"
    path.write_text(two_pages().text)
    body = {"document": str(path), "question": "Which boats?", "max_new_tokens": 4, "stream": False}
    cited = Client(url).ask({**body, "cite": True})
    assert cited["answers"][0]["citations"] and cited["answers"][0]["citations"][0]["page"] in (1, 2)
    assert "citations" not in Client(url).ask(body)["answers"][0]
    written = []
    remote_ask(url, source=str(path), questions=["Which boats?"], method="kvzip", ratio=None, budget=None, agnostic=False, reuse=True,
               max_new_tokens=4, temperature=0.0, seed=None, password=None, json_out=False, write=written.append, cite=True)
    assert "".join(written).rstrip().endswith(")") and " (p. " in "".join(written)


@pytest.mark.slow
def test_the_embedded_model_cites_the_page_of_its_answer(model_cache_dir):
    """The sample PDF states the headquarters on page 1 (Duluth is named again later)."""
    from pathlib import Path

    from tests.support import run_kvcli

    pdf = Path(__file__).resolve().parents[1] / "samples" / "annual_report.pdf"
    question = "In which city is the headquarters of Northwind Lantern Co.?"
    result = run_kvcli(["ask", str(pdf), question, "--cite", "--dtype", "float32", "--quiet"], {"KVCLI_CACHE_DIR": model_cache_dir})
    assert result.returncode == 0, result.stderr
    assert "Duluth" in result.stdout and result.stdout.rstrip().endswith("(p. 1)")
