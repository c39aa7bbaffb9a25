"""Load documents (PDF, plain text, Markdown, or stdin) into one normalized string.

`load_document` returns a `Document`: the text the model will read, the SHA-256 of the
raw input bytes (the cache store keys on it, so the same file always finds its cache
whatever its name), one character span per page (so an answer's position can be cited
as a page), and warnings for the caller to show. This module never prints: every
failure the user can fix is a `KvcliError` with a one-line message naming the file.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import io
import logging
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from kvcli.errors import KvcliError

if TYPE_CHECKING:  # pypdf is imported only when a PDF is read
    from pypdf import PdfReader

__all__ = [
    "Document",
    "PageSpan",
    "PDF_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "STDIN_NAME",
    "load_document",
]

PDF_EXTENSIONS = (".pdf",)
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown")
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS + TEXT_EXTENSIONS
STDIN_NAME = "<stdin>"

# Pages are joined with one blank line: enough for the model to see a break, and it can
# never create a run of blank lines longer than normalization allows.
PAGE_SEPARATOR = "\n\n"

# Three or more consecutive blank (empty or whitespace-only) lines; PDF extraction and
# hand-written text both produce these, and they cost tokens while saying nothing.
_BLANK_RUN = re.compile(r"\n(?:[ \t\f\v]*\n){3,}")
_UTF8_REPLACEMENT = b"\xef\xbf\xbd"  # U+FFFD encoded, to tell genuine ones from ours


@dataclass(frozen=True)
class PageSpan:
    """Page `page` (1-based) is `text[start:end]` of its document."""

    page: int
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    """A loaded document: normalized text plus where each page lies in it."""

    name: str
    text: str
    sha256: str
    pages: list[PageSpan]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @cached_property
    def _content_pages(self) -> tuple[list[int], list[int]]:
        # Only pages with text own characters; an empty page has start == end and would
        # otherwise capture the offsets of the separator or the page that follows it.
        spans = [span for span in self.pages if span.end > span.start] or self.pages[:1]
        return [span.start for span in spans], [span.page for span in spans]

    def page_of(self, char_offset: int) -> int:
        """The 1-based page holding `text[char_offset]`.

        Offsets inside the separator between two pages belong to the page before it;
        `len(text)` (one past the end) is accepted and maps to the last page.
        """
        if not 0 <= char_offset <= len(self.text):
            raise ValueError(f"offset {char_offset} is outside the document (length {len(self.text)})")
        starts, numbers = self._content_pages
        if not starts:
            return 1
        index = bisect.bisect_right(starts, char_offset) - 1
        return numbers[max(index, 0)]


def load_document(source: str, *, password: str | None = None, stdin: BinaryIO | None = None) -> Document:
    """Read `source` (a .pdf/.txt/.text/.md/.markdown path, or "-" for stdin).

    Input on stdin is sniffed: bytes starting with "%PDF-" are a PDF, anything else is
    UTF-8 text. `password` opens an encrypted PDF; without one the empty password is
    tried, which is all many "encrypted" PDFs need. Raises KvcliError on any input the
    user has to fix.
    """
    if source == "-":
        name = display = STDIN_NAME
        raw = _read_stdin(stdin if stdin is not None else sys.stdin.buffer)
        is_pdf = raw.lstrip(b"\r\n\t \x00")[:5] == b"%PDF-"
    else:
        path = Path(source)
        name, display = path.name or source, _one_line(source)
        is_pdf = _check_path(path, display)
        raw = _read_file(path, display)

    if not raw.strip():
        raise KvcliError(f"{display} is empty (no text to read)")

    digest = hashlib.sha256(raw).hexdigest()
    warnings_: list[str] = []
    if is_pdf:
        page_texts = _pdf_pages(raw, display, password, warnings_)
    else:
        page_texts = [_decode_text(raw, warnings_)]

    text, pages = _assemble(page_texts)
    if not text.strip():
        if is_pdf:
            raise KvcliError(f"{display} has no extractable text (scanned PDF?); run OCR first, e.g. ocrmypdf")
        raise KvcliError(f"{display} is empty (only whitespace, no text to read)")
    return Document(name=name, text=text, sha256=digest, pages=pages, warnings=warnings_)


# ---- reading bytes ----------------------------------------------------------------------


def _one_line(value: str, limit: int = 200) -> str:
    """Make `value` safe inside a one-line message (file names may hold newlines)."""
    flat = str(value).replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _check_path(path: Path, display: str) -> bool:
    """Fail early on paths we cannot load; return whether it is a PDF."""
    try:
        if not path.exists():
            raise KvcliError(f"no such file: {display}")
        if path.is_dir():
            raise KvcliError(f"{display} is a directory, not a document; give a file")
    except OSError as exc:  # e.g. a path component we may not search
        raise KvcliError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from None
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise KvcliError(
            f"{display}: unsupported file type {kind}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, or '-' to read stdin"
        )
    return suffix in PDF_EXTENSIONS


def _read_file(path: Path, display: str) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise KvcliError(f"cannot read {display}: permission denied") from None
    except IsADirectoryError:
        raise KvcliError(f"{display} is a directory, not a document; give a file") from None
    except OSError as exc:
        raise KvcliError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from None


def _read_stdin(stream: BinaryIO) -> bytes:
    # Reading a terminal would wait silently for the user to type a document.
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        raise KvcliError("'-' reads the document from stdin, but stdin is a terminal; pipe a file in (e.g. < report.pdf)")
    try:
        data = stream.read()
    except OSError as exc:
        raise KvcliError(f"cannot read stdin: {_one_line(exc.strerror or exc)}") from None
    if isinstance(data, str):  # a text stream was passed; be lenient
        data = data.encode("utf-8", errors="surrogateescape")
    return data


# ---- text ---------------------------------------------------------------------------------


def _decode_text(raw: bytes, warnings_: list[str]) -> str:
    """Decode as UTF-8 (BOM tolerated), replacing and counting invalid sequences."""
    if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        # Windows tools still write UTF-16; decoding it as UTF-8 would yield NUL soup.
        text = raw.decode("utf-16", errors="replace")
        genuine = raw.decode("utf-16", errors="ignore").count("\ufffd")
    else:
        text = raw.decode("utf-8-sig", errors="replace")
        # Each invalid sequence becomes one U+FFFD; subtract the ones truly in the file
        # (EF BF BD is never swallowed by an invalid sequence, so the count is exact).
        genuine = raw.count(_UTF8_REPLACEMENT)
    replaced = text.count("\ufffd") - genuine
    if replaced > 0:
        noun = "sequence was" if replaced == 1 else "sequences were"
        warnings_.append(f"{replaced} invalid UTF-8 byte {noun} replaced with U+FFFD")
    return text


def _normalize(text: str) -> str:
    """One page's text as the model reads it: no NULs, LF newlines, short blank runs."""
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = _BLANK_RUN.sub("\n\n\n", text)
    # Edge whitespace is layout, not content; stripping it keeps the page joins uniform.
    return text.strip()


def _assemble(page_texts: list[str]) -> tuple[str, list[PageSpan]]:
    """Join normalized pages, recording each page's span in the joined text."""
    parts: list[str] = []
    spans: list[PageSpan] = []
    offset = 0
    for number, raw_page in enumerate(page_texts, start=1):
        page = _normalize(raw_page)
        if page and parts:
            # Separators go only between pages with text, so empty pages add nothing.
            parts.append(PAGE_SEPARATOR)
            offset += len(PAGE_SEPARATOR)
        spans.append(PageSpan(page=number, start=offset, end=offset + len(page)))
        parts.append(page)
        offset += len(page)
    return "".join(parts), spans


# ---- PDF ----------------------------------------------------------------------------------


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Silence pypdf's log and warning chatter about malformed-but-readable files."""
    logger = logging.getLogger("pypdf")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def _pdf_pages(raw: bytes, display: str, password: str | None, warnings_: list[str]) -> list[str]:
    """Extract each page's text; every pypdf failure becomes a KvcliError."""
    try:
        import pypdf
        from pypdf.errors import DependencyError
    except ImportError:  # pragma: no cover - pypdf is a dependency
        raise KvcliError(f"reading {display} needs pypdf: pip install pypdf") from None

    corrupt = f"{display} is corrupt or not a valid PDF"
    # pypdf decrypts AES only with the optional 'cryptography' package, and may find out
    # it needs it while opening the file, checking a password or reading a page.
    needs_crypto = f"{display} is encrypted with AES, which needs the 'cryptography' package: pip install cryptography"
    with _quiet_pypdf():
        try:
            reader = pypdf.PdfReader(io.BytesIO(raw))
        except DependencyError:
            raise KvcliError(needs_crypto) from None
        except Exception as exc:  # pypdf raises many types for broken files
            raise KvcliError(f"{corrupt} ({_brief(exc)})") from None

        if reader.is_encrypted:
            _decrypt(reader, display, password, needs_crypto)

        try:
            pages = list(reader.pages)
        except Exception as exc:
            raise KvcliError(f"{corrupt} ({_brief(exc)})") from None

        texts: list[str] = []
        failed: list[int] = []
        for number, page in enumerate(pages, start=1):
            try:
                texts.append(page.extract_text() or "")
            except DependencyError:
                raise KvcliError(needs_crypto) from None
            except Exception:
                # One bad content stream should not cost the rest of the document.
                failed.append(number)
                texts.append("")

    if not pages:
        raise KvcliError(f"{corrupt} (it has no pages)")
    if failed and len(failed) == len(pages):
        raise KvcliError(f"{corrupt} (no page could be read)")
    if failed:
        which = f"pages {_page_list(failed)}" if len(failed) > 1 else f"page {failed[0]}"
        warnings_.append(f"could not read the text of {which} (damaged)")
    blank = [n for n, text in enumerate(texts, start=1) if not text.strip() and n not in failed]
    if blank and len(blank) < len(pages):
        pages_have = f"pages {_page_list(blank)} have" if len(blank) > 1 else f"page {blank[0]} has"
        warnings_.append(f"{pages_have} no extractable text (scanned images?)")
    return texts


def _decrypt(reader: PdfReader, display: str, password: str | None, needs_crypto: str) -> None:
    from pypdf.errors import DependencyError, WrongPasswordError

    # The empty user password is tried too: many PDFs are "encrypted" only to restrict
    # printing or copying and open without one.
    candidates = [password, ""] if password else [""]
    for candidate in candidates:
        try:
            if reader.decrypt(candidate):
                return
        except DependencyError:
            raise KvcliError(needs_crypto) from None
        except WrongPasswordError:  # some pypdf versions raise rather than return 0
            continue
        except Exception as exc:
            raise KvcliError(f"{display} is encrypted and could not be decrypted ({_brief(exc)})") from None
    if password:
        raise KvcliError(f"{display} is encrypted and the password given is wrong; pass the right one with --password")
    raise KvcliError(f"{display} is encrypted; pass its password with --password")


def _brief(exc: BaseException) -> str:
    """An exception as a short single line for an error message."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return _one_line(detail, limit=120)


def _page_list(numbers: list[int], shown: int = 10) -> str:
    head = ", ".join(str(n) for n in numbers[:shown])
    return head + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")
