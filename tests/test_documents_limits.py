"""Documents from paths someone else chose (issue 14 items 1, 4 and 11): links resolved before
the extension is checked, only regular files read, every input read under a size bound, and
a PDF page beyond pypdf's limits reported as that, not as damage."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pypdf
import pytest

from kvcli.documents import MAX_BYTES_ENV, load_document
from kvcli.errors import KvcliError
from tests.support import error_of

ROOT = Path(__file__).resolve().parents[1]


def test_a_txt_link_to_a_file_of_another_type_is_refused(tmp_path):
    """`notes.txt -> /etc/shadow` used to be read: the extension was the link's."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    link = tmp_path / "notes.txt"
    link.symlink_to(secret)
    message = error_of(link)
    assert message == (
        f"{link} links to a file of unsupported type (no extension); supported: .pdf, .txt, .text, .md, .markdown, or '-' to read stdin"
    )
    assert "secret-hash" not in message


def test_links_to_documents_still_work(tmp_path):
    target = tmp_path / "real.md"
    target.write_text("# Title\n\nThe auditor is Pike.\n")
    link = tmp_path / "alias.txt"
    link.symlink_to(target)
    doc = load_document(str(link))
    assert doc.name == "alias.txt" and "Pike" in doc.text
    dangling = tmp_path / "gone.txt"
    dangling.symlink_to(tmp_path / "missing.txt")
    assert error_of(dangling) == f"{dangling} is a link to a missing file"


def test_a_nul_byte_in_the_path_is_a_one_line_error(tmp_path):
    assert error_of(f"{tmp_path}/a\0b.txt").endswith("a path cannot contain a NUL byte")


def test_dev_zero_named_txt_is_refused(tmp_path):
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    assert "links to a file of unsupported type" in error_of(link)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_txt_is_refused_without_blocking(tmp_path):
    """Opening a FIFO used to wait for a writer forever (and held the server's model lock)."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from kvcli.documents import load_document
        from kvcli.errors import KvcliError
        try:
            load_document({str(fifo)!r})
        except KvcliError as e:
            print(e)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"{fifo} is not a regular file (a pipe, device or socket); give a document file, or pipe it to '-'"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_named_txt_is_refused(tmp_path):
    device = tmp_path / "zero.txt"
    os.mknod(device, 0o600 | 0o020000, os.makedev(1, 5))  # a character device, like /dev/zero
    assert "is not a regular file" in error_of(device)


def test_size_bound(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("word " * 400)  # 2,000 bytes
    message = error_of(path, max_bytes=1000)
    assert message == (
        f"{path} is too large (2,000 bytes, over the 1,000 bytes document size limit); "
        f"raise it with {MAX_BYTES_ENV}=<bytes> if you mean to read it"
    )
    assert load_document(str(path), max_bytes=2000).text.startswith("word")
    monkeypatch.setenv(MAX_BYTES_ENV, "1500")
    assert "over the 1,500 bytes document size limit" in error_of(path)
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    assert error_of(path) == f"{MAX_BYTES_ENV} must be a number of bytes, not 'lots'"
    assert error_of(path, max_bytes=0) == "the document size limit must be a positive number of bytes, not 0"


class Endless(io.RawIOBase):
    """stdin that never ends (`yes | kvcli ask - ...`): counts what was asked of it."""

    def __init__(self):
        self.served = 0

    def readable(self):
        return True

    def read(self, n=-1):
        n = 1 << 16 if n is None or n < 0 else n
        self.served += n
        return b"y\n" * (n // 2) + b"y" * (n % 2)


def test_stdin_is_bounded():
    """stdin used to be read whole: an endless pipe ran the process out of memory."""
    stream = Endless()
    with pytest.raises(KvcliError) as e:
        load_document("-", stdin=stream, max_bytes=5 << 20)
    assert str(e.value) == f"stdin is too large (over the 5 MiB document size limit); raise it with {MAX_BYTES_ENV}=<bytes> if you mean to read it"
    assert stream.served <= (5 << 20) + (1 << 20)
    assert load_document("-", stdin=io.BytesIO(b"short text"), max_bytes=100).text == "short text"


def pdf_with_page(content: bytes) -> bytes:
    """A minimal one-page PDF whose content stream is `content` (uncompressed)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# 200 text-showing operations: 2,200 tokens in one page's content stream.
DENSE_PAGE = pdf_with_page(b"BT /F1 12 Tf 72 700 Td (The auditor is Pike.) Tj ET\n" * 200)


def test_a_dense_pdf_page_beyond_pypdfs_token_limit_is_read(tmp_path):
    """The 23 MB page of the issue was refused as corrupt: it passes pypdf's 2M tokens per
    content stream. Scaled down (pypdf's limit lowered to 500 here), the page is read: the
    limit is raised within the document size bound."""
    path = tmp_path / "dense.pdf"
    path.write_bytes(DENSE_PAGE)
    with pypdf.apply_configuration(stream_parsing_work_maximum_count=500):
        doc = load_document(str(path))
    assert doc.text.count("The auditor is Pike.") == 200


def test_a_pdf_page_beyond_every_limit_says_so(tmp_path):
    path = tmp_path / "dense.pdf"
    path.write_bytes(DENSE_PAGE)
    # a 20 KB size bound allows 625 tokens a page, pypdf (lowered here) 500: the page has 2,200
    with pypdf.apply_configuration(stream_parsing_work_maximum_count=500):
        message = error_of(path, max_bytes=20_000)
    assert message.startswith(f"{path}: page 1 exceeds a safety limit of the PDF reader (Reached maximum number of tokens per stream")
    assert "the file may be fine" in message and "pdftotext" in message and MAX_BYTES_ENV in message
    assert "corrupt" not in message


def test_password_from_a_file_or_the_terminal(tmp_path, monkeypatch):
    """--password @FILE reads the file's first line; - asks on the terminal; neither is in argv."""
    import getpass

    from kvcli.cli.main import resolve_password
    from kvcli.errors import KvcliError

    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    assert resolve_password(f"@{secret}") == "s3cret"
    assert resolve_password("plain") == "plain" and resolve_password(None) is None
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "typed")
    assert resolve_password("-") == "typed"
    with pytest.raises(KvcliError, match="cannot read"):
        resolve_password(f"@{tmp_path / 'missing'}")
