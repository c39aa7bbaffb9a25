"""Tests for kvcli.documents: loading, page mapping, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter

from kvcli.documents import Document, PageSpan, load_document
from tests.support import error_of

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
REPORT = SAMPLES / "annual_report.pdf"
NOTES = SAMPLES / "field_notes.txt"
QUESTIONS = SAMPLES / "questions.jsonl"

# A fact stated on exactly one page of the sample report, for each page.
REPORT_FACTS = {
    1: "headquartered in Duluth, Minnesota",
    2: "My name is Margaret Okafor",
    3: "$41.9 million",
    4: "61,000 Harbor Beacon",
    5: "had 412 employees",
    6: "acquired Lumenfield Optics for $6.3 million",
    7: "Our largest customer is Baywater Outfitters",
    8: "audited by Halvorsen & Pike LLP",
}


def sample_pdf_bytes(pages: int = 2) -> bytes:
    """The first `pages` pages of the sample report, as a fresh PDF."""
    reader = PdfReader(REPORT)
    writer = PdfWriter()
    for page in reader.pages[:pages]:
        writer.add_page(page)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def encrypted_pdf(path: Path, user_password: str, owner_password: str = "owner-secret") -> Path:
    reader = PdfReader(io.BytesIO(sample_pdf_bytes()))
    writer = PdfWriter()
    for page in reader.pages:
        writer.add_page(page)
    # RC4-128 needs no optional crypto package, so the test runs everywhere pypdf does.
    writer.encrypt(user_password, owner_password, algorithm="RC4-128")
    with path.open("wb") as handle:
        writer.write(handle)
    return path


# ---- the sample documents -------------------------------------------------------------


def test_sample_pdf_pages_and_page_of():
    doc = load_document(str(REPORT))
    assert isinstance(doc, Document)
    assert doc.name == "annual_report.pdf"
    assert doc.num_pages == 8 == len(PdfReader(REPORT).pages)
    assert [span.page for span in doc.pages] == list(range(1, 9))
    assert doc.sha256 == hashlib.sha256(REPORT.read_bytes()).hexdigest()
    assert doc.warnings == []
    for page, fact in REPORT_FACTS.items():
        offset = doc.text.find(fact)
        assert offset >= 0, f"page {page} fact missing: {fact!r}"
        assert doc.text.count(fact) == 1
        assert doc.page_of(offset) == page, fact
        assert doc.page_of(offset + len(fact) - 1) == page, fact
        span = doc.pages[page - 1]
        assert span.start <= offset < span.end


def test_sample_pdf_spans_tile_the_text():
    doc = load_document(str(REPORT))
    # Spans are in order, do not overlap, and the gaps hold only the page separator.
    assert doc.pages[0].start == 0 and doc.pages[-1].end == len(doc.text)
    for before, after in zip(doc.pages, doc.pages[1:]):
        assert doc.text[before.end:after.start] == "\n\n"
    assert doc.text[doc.pages[1].start:].startswith("Letter from the Chief Executive Officer")
    assert doc.page_of(0) == 1
    assert doc.page_of(len(doc.text)) == 8
    assert doc.page_of(doc.pages[0].end) == 1  # the separator belongs to the page before
    with pytest.raises(ValueError):
        doc.page_of(-1)
    with pytest.raises(ValueError):
        doc.page_of(len(doc.text) + 1)


def test_sample_text_file():
    doc = load_document(str(NOTES))
    assert doc.name == "field_notes.txt"
    assert doc.num_pages == 1
    assert doc.pages == [PageSpan(page=1, start=0, end=len(doc.text))]
    assert doc.text.startswith("FIELD NOTES FROM THE GANNET ROCK LIGHT")
    assert "My name is Ansel Marrow" in doc.text
    assert doc.page_of(len(doc.text) // 2) == 1
    assert doc.warnings == []
    assert doc.sha256 == hashlib.sha256(NOTES.read_bytes()).hexdigest()


def test_questions_answers_appear_in_their_documents():
    docs = {name: load_document(str(SAMPLES / name)) for name in ("annual_report.pdf", "field_notes.txt", "long_manual.txt")}
    per_document = {name: 0 for name in docs}
    lines = [line for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines:
        item = json.loads(line)
        assert set(item) == {"document", "question", "answers", "location", "page"}, item
        assert item["document"] in docs, item
        assert item["location"] in {"early", "middle", "late"}, item
        assert item["question"].strip().endswith("?")
        assert item["answers"] and all(isinstance(a, str) and a.strip() for a in item["answers"])
        text = docs[item["document"]].text.lower()
        for answer in item["answers"]:
            assert answer.lower() in text, f"{item['document']}: answer {answer!r} not in the extracted text"
        # The first answer is the fact as stated; it must sit where `location` says.
        where = text.find(item["answers"][0].lower()) / len(text)
        band = {"early": (0.0, 0.4), "middle": (0.3, 0.75), "late": (0.6, 1.0)}[item["location"]]
        assert band[0] <= where <= band[1], (item["question"], round(where, 2))
        # `page`: the first page stating an answer (what citations are measured against)
        doc = docs[item["document"]]
        stating = [s.page for s in doc.pages if any(a.lower() in doc.text[s.start : s.end].lower() for a in item["answers"])]
        assert item["page"] == min(stating), (item["question"], item["page"], stating)
        per_document[item["document"]] += 1
    assert all(count >= 8 for count in per_document.values()), per_document


# ---- stdin ----------------------------------------------------------------------------


def test_stdin_text():
    raw = "Line one.\r\nThe keeper is Ada.\n".encode()
    doc = load_document("-", stdin=io.BytesIO(raw))
    assert doc.name == "<stdin>"
    assert doc.text == "Line one.\nThe keeper is Ada."
    assert doc.num_pages == 1
    assert doc.sha256 == hashlib.sha256(raw).hexdigest()


def test_stdin_pdf_is_sniffed():
    raw = REPORT.read_bytes()
    doc = load_document("-", stdin=io.BytesIO(raw))
    assert doc.name == "<stdin>"
    assert doc.num_pages == 8
    assert doc.text == load_document(str(REPORT)).text
    assert doc.sha256 == hashlib.sha256(raw).hexdigest()
    assert doc.page_of(doc.text.find(REPORT_FACTS[8])) == 8


def test_stdin_garbage_pdf_is_reported_as_corrupt():
    message = error_of("-", stdin=io.BytesIO(b"%PDF-1.7\nthis is not really a pdf\n"))
    assert "<stdin>" in message and "corrupt" in message


def test_stdin_terminal_is_refused():
    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    assert "terminal" in error_of("-", stdin=Terminal(b"never read"))


# ---- text decoding and normalization --------------------------------------------------


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "broken.txt"
    # Three invalid sequences (a lone continuation byte, a truncated 2-byte lead, 0xFF),
    # plus one genuine U+FFFD that must not be counted.
    path.write_bytes(b"caf\xc3\xa9 \x80 ok \xc3 and \xff end \xef\xbf\xbd")
    doc = load_document(str(path))
    assert doc.warnings == ["3 invalid UTF-8 byte sequences were replaced with U+FFFD"]
    assert doc.text.count("\ufffd") == 4
    assert doc.text.startswith("café ")


def test_one_invalid_sequence_uses_singular(tmp_path):
    path = tmp_path / "one.md"
    path.write_bytes(b"# Title\n\nbad \xfe byte\n")
    doc = load_document(str(path))
    assert doc.warnings == ["1 invalid UTF-8 byte sequence was replaced with U+FFFD"]


def test_normalization_strips_nuls_and_collapses_blank_lines(tmp_path):
    path = tmp_path / "messy.markdown"
    path.write_bytes(b"\xef\xbb\xbfHe\x00llo\r\n\r\n\r\n\r\n  \n\t\nWorld\n\n\nEnd\n\n")
    doc = load_document(str(path))
    assert doc.text == "Hello\n\n\nWorld\n\n\nEnd"
    assert doc.pages == [PageSpan(1, 0, len(doc.text))]
    assert doc.warnings == []


@pytest.mark.parametrize("suffix", [".txt", ".text", ".md", ".markdown", ".TXT"])
def test_text_extensions_accepted(tmp_path, suffix):
    path = tmp_path / f"doc{suffix}"
    path.write_text("The auditor is Pike.", encoding="utf-8")
    assert load_document(str(path)).text == "The auditor is Pike."


def test_pdf_with_blank_middle_page_keeps_page_numbers(tmp_path):
    reader = PdfReader(io.BytesIO(sample_pdf_bytes(2)))
    writer = PdfWriter()
    writer.add_page(reader.pages[0])
    writer.add_blank_page(width=612, height=792)
    writer.add_page(reader.pages[1])
    path = tmp_path / "gap.pdf"
    with path.open("wb") as handle:
        writer.write(handle)
    doc = load_document(str(path))
    assert doc.num_pages == 3
    assert doc.pages[1].start == doc.pages[1].end  # the blank page owns no text
    assert doc.page_of(doc.text.find("Margaret Okafor")) == 3
    assert doc.page_of(doc.text.find("Duluth")) == 1
    assert "\n\n\n\n" not in doc.text
    assert any("page 2" in warning and "no extractable text" in warning for warning in doc.warnings)


# ---- bad input: one clear line each ------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pdf"
    message = error_of(path)
    assert message == f"no such file: {path}"


def test_directory(tmp_path):
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "directory" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "report.docx"
    path.write_bytes(b"PK\x03\x04 not for us")
    message = error_of(path)
    assert "report.docx" in message and "unsupported" in message
    for suffix in (".pdf", ".txt", ".md", ".text", ".markdown"):
        assert suffix in message


def test_no_extension(tmp_path):
    path = tmp_path / "README"
    path.write_text("hello", encoding="utf-8")
    assert "unsupported" in error_of(path)


def test_encrypted_pdf_needs_password(tmp_path):
    path = encrypted_pdf(tmp_path / "secret.pdf", user_password="hunter2")
    message = error_of(path)
    assert "secret.pdf" in message and "encrypted" in message and "--password" in message

    wrong = error_of(path, password="wrong")
    assert "secret.pdf" in wrong and "wrong" in wrong and "--password" in wrong

    doc = load_document(str(path), password="hunter2")
    assert doc.num_pages == 2
    assert doc.page_of(doc.text.find("Margaret Okafor")) == 2
    assert doc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    # The owner password opens it too.
    assert load_document(str(path), password="owner-secret").text == doc.text


def test_encrypted_pdf_with_empty_user_password_opens_without_one(tmp_path):
    path = encrypted_pdf(tmp_path / "restricted.pdf", user_password="")
    doc = load_document(str(path))
    assert "Duluth" in doc.text
    # A wrong password is not fatal when the empty one works.
    assert load_document(str(path), password="whatever").text == doc.text


def test_aes_pdf_without_cryptography_package(tmp_path, monkeypatch):
    # Writing an AES PDF itself needs 'cryptography', so simulate pypdf's complaint.
    import pypdf
    from pypdf.errors import DependencyError

    def needs_cryptography(*args, **kwargs):
        raise DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(pypdf, "PdfReader", needs_cryptography)
    path = tmp_path / "aes.pdf"
    path.write_bytes(sample_pdf_bytes(1))
    message = error_of(path)
    assert "aes.pdf" in message and "encrypted" in message and "pip install cryptography" in message


def test_pdf_without_text_layer(tmp_path):
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.add_blank_page(width=612, height=792)
    path = tmp_path / "scan.pdf"
    with path.open("wb") as handle:
        writer.write(handle)
    message = error_of(path)
    assert message == f"{path} has no extractable text (scanned PDF?); run OCR first, e.g. ocrmypdf"


@pytest.mark.parametrize("content", [b"", b"   \n\n\t  \r\n", b"\x00\x00\n"], ids=["empty", "whitespace", "nuls"])
def test_empty_text_file(tmp_path, content):
    path = tmp_path / "blank.txt"
    path.write_bytes(content)
    message = error_of(path)
    assert "blank.txt" in message and "empty" in message


def test_empty_pdf_file(tmp_path):
    path = tmp_path / "zero.pdf"
    path.write_bytes(b"")
    message = error_of(path)
    assert "zero.pdf" in message and "empty" in message


@pytest.mark.parametrize(
    "content",
    [
        b"this is plain garbage, not a PDF at all" * 20,
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\n",
        None,  # the sample report cut in half
    ],
    ids=["garbage", "header-only", "truncated"],
)
def test_corrupt_pdf(tmp_path, content):
    if content is None:
        raw = REPORT.read_bytes()
        content = raw[: len(raw) // 2]
    path = tmp_path / "broken.pdf"
    path.write_bytes(content)
    message = error_of(path)
    assert "broken.pdf" in message and "corrupt" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")
    path.chmod(0)
    try:
        message = error_of(path)
    finally:
        path.chmod(0o600)
    assert "locked.txt" in message and "permission denied" in message


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    # Root (CI containers) can read a chmod 0 file, so also simulate the failure.
    path = tmp_path / "locked.pdf"
    path.write_bytes(REPORT.read_bytes())

    real_open = os.open

    def deny(target, flags, *args):
        if os.path.realpath(target) == os.path.realpath(path):
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, flags, *args)

    monkeypatch.setattr(os, "open", deny)
    message = error_of(path)
    assert message == f"cannot read {path}: permission denied"


def test_pypdf_noise_is_silenced(tmp_path, caplog):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\n")
    with caplog.at_level("DEBUG"):
        error_of(path)
    assert not [record for record in caplog.records if record.name.startswith("pypdf") and record.levelname == "WARNING"]
