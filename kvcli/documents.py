"""Load documents (PDF, plain text, Markdown, or stdin) into one normalized string.

`load_document` returns a `Document`: the text the model will read, the SHA-256 of the
raw input bytes (the cache store keys on it, so the same file always finds its cache
whatever its name), one character span per page (so an answer's position can be cited
as a page), and warnings for the caller to show. This module never prints: every
failure the user can fix is a `KvcliError` with a one-line message naming the file.

Paths may come from someone else (`kvcli serve` reads the paths its clients send), so a
path is resolved (links followed, `os.path.realpath`) before its extension is checked:
`notes.txt -> /etc/shadow` is a link to a file with no supported extension, not a text
file. Only regular files are read (a FIFO or /dev/zero named `.txt` is refused at once,
never blocks), opened without blocking and checked on the open descriptor, and every
input, stdin included, is read under a size bound (`max_bytes`, default
DEFAULT_MAX_BYTES or $KVCLI_MAX_DOCUMENT_BYTES) before any parsing.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import io
import logging
import os
import re
import stat
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
# 256 MiB of raw input: ~60M tokens of text, far beyond any context we read, yet small
# enough that a runaway input (/dev/zero, a huge log) fails in a second, not at a
# MemoryError after gigabytes.
DEFAULT_MAX_BYTES = 256 << 20
MAX_BYTES_ENV = "KVCLI_MAX_DOCUMENT_BYTES"
# pypdf refuses a page content stream of more than 2M tokens (about 9 MB of text
# operators), which legitimate dense pages exceed. We allow one token per
# PDF_BYTES_PER_TOKEN bytes of the size bound instead (8.4M at 256 MiB): measured ~120
# bytes of memory and ~60 us per token (pypdf 7, this CPU), so parsing stays within
# about 4x the size bound in memory.
PDF_BYTES_PER_TOKEN = 32

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


def load_document(
    source: str, *, password: str | None = None, stdin: BinaryIO | None = None, max_bytes: int | None = None
) -> Document:
    """Read `source` (a .pdf/.txt/.text/.md/.markdown path, or "-" for stdin).

    Input on stdin is sniffed: bytes starting with "%PDF-" are a PDF, anything else is
    UTF-8 text. `password` opens an encrypted PDF; without one the empty password is
    tried, which is all many "encrypted" PDFs need. `max_bytes` bounds the raw input
    (default: $KVCLI_MAX_DOCUMENT_BYTES, else DEFAULT_MAX_BYTES). Raises KvcliError on any
    input the user has to fix.
    """
    limit = max_document_bytes(max_bytes)
    if source == "-":
        name = display = STDIN_NAME
        raw = _read_stdin(stdin if stdin is not None else sys.stdin.buffer, limit)
        is_pdf = raw.lstrip(b"\r\n\t \x00")[:5] == b"%PDF-"
    else:
        name, display = Path(source).name or source, _one_line(source)
        real = _resolve(source, display)
        is_pdf = _check_path(real, display, linked=os.path.islink(source))
        raw = _read_file(real, display, limit)

    if not raw.strip():
        raise KvcliError(f"{display} is empty (no text to read)")

    digest = hashlib.sha256(raw).hexdigest()
    warnings_: list[str] = []
    if is_pdf:
        page_texts = _pdf_pages(raw, display, password, warnings_, max(1, limit // PDF_BYTES_PER_TOKEN))
    else:
        page_texts = [_decode_text(raw, warnings_)]

    text, pages = _assemble(page_texts)
    if not text.strip():
        if is_pdf:
            raise KvcliError(f"{display} has no extractable text (scanned PDF?); run OCR first, e.g. ocrmypdf")
        raise KvcliError(f"{display} is empty (only whitespace, no text to read)")
    return Document(name=name, text=text, sha256=digest, pages=pages, warnings=warnings_)


def max_document_bytes(max_bytes: int | None = None) -> int:
    """The size bound in effect: `max_bytes`, else $KVCLI_MAX_DOCUMENT_BYTES, else the default."""
    if max_bytes is None:
        value = os.environ.get(MAX_BYTES_ENV, "").strip()
        if not value:
            return DEFAULT_MAX_BYTES
        try:
            max_bytes = int(value)
        except ValueError:
            raise KvcliError(f"{MAX_BYTES_ENV} must be a number of bytes, not {_one_line(value, 40)!r}") from None
    if type(max_bytes) is not int or max_bytes < 1:
        raise KvcliError(f"the document size limit must be a positive number of bytes, not {max_bytes!r}")
    return max_bytes


# ---- reading bytes ----------------------------------------------------------------------


def _one_line(value: str, limit: int = 200) -> str:
    """Make `value` safe inside a one-line message (file names may hold newlines)."""
    flat = str(value).replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def _too_large(display: str, limit: int, size: int | None = None) -> KvcliError:
    what = f"{_size(size)}, over" if size is not None else "over"
    return KvcliError(
        f"{display} is too large ({what} the {_size(limit)} document size limit); "
        f"raise it with {MAX_BYTES_ENV}=<bytes> if you mean to read it"
    )


def _resolve(source: str, display: str) -> Path:
    """The file `source` names, links resolved; fails early on paths we cannot load."""
    try:
        real = Path(os.path.realpath(source))
        if not real.exists():
            if os.path.lexists(source):
                raise KvcliError(f"{display} is a link to a missing file")
            raise KvcliError(f"no such file: {display}")
        if real.is_dir():
            raise KvcliError(f"{display} is a directory, not a document; give a file")
    except OSError as exc:  # e.g. a path component we may not search, a link loop
        raise KvcliError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from None
    except ValueError:  # a NUL byte (a path sent to the server as JSON may hold one)
        raise KvcliError(f"cannot read {display!r}: a path cannot contain a NUL byte") from None
    return real


def _check_path(real: Path, display: str, *, linked: bool) -> bool:
    """The extension of the file itself (not of a link to it) must be one we read; returns
    whether it is a PDF."""
    suffix = real.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        kind = f"'{_one_line(suffix, 20)}'" if suffix else "(no extension)"
        subject = f"{display} links to a file of unsupported type {kind}" if linked else f"{display}: unsupported file type {kind}"
        raise KvcliError(f"{subject}; supported: {', '.join(SUPPORTED_EXTENSIONS)}, or '-' to read stdin")
    return suffix in PDF_EXTENSIONS


def _read_file(real: Path, display: str, limit: int) -> bytes:
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (and, in the
    # server, hold the model lock); O_NOFOLLOW: the resolved path must not have become a
    # link since. What is opened is checked on the descriptor, not the name.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except PermissionError:
        raise KvcliError(f"cannot read {display}: permission denied") from None
    except FileNotFoundError:
        raise KvcliError(f"no such file: {display}") from None
    except OSError as exc:
        raise KvcliError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise KvcliError(f"{display} is a directory, not a document; give a file")
        if not stat.S_ISREG(info.st_mode):
            raise KvcliError(f"{display} is not a regular file (a pipe, device or socket); give a document file, or pipe it to '-'")
        if info.st_size > limit:
            raise _too_large(display, limit, info.st_size)
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            return _read_bounded(handle, limit, display, info.st_size)
    except IsADirectoryError:
        raise KvcliError(f"{display} is a directory, not a document; give a file") from None
    except OSError as exc:
        raise KvcliError(f"cannot read {display}: {_one_line(exc.strerror or exc)}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _read_bounded(stream, limit: int, display: str, expected: int = 0) -> bytes:
    """All of `stream`, failing as soon as it passes `limit` bytes (a file may grow while
    read; stdin has no size). Reads what is expected first, then in 1 MiB pieces, so a
    small input never allocates a buffer of the limit's size."""
    parts: list[bytes] = []
    total = 0
    want = expected + 1 if expected else 1 << 16
    while True:
        part = stream.read(min(want, limit + 1 - total))
        if not part:
            break
        if isinstance(part, str):  # a text stream was passed; be lenient
            part = part.encode("utf-8", errors="surrogateescape")
        parts.append(part)
        total += len(part)
        if total > limit:
            raise _too_large(display, limit)
        want = 1 << 20
    return b"".join(parts)


def _read_stdin(stream: BinaryIO, limit: int) -> bytes:
    # Reading a terminal would wait silently for the user to type a document.
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        raise KvcliError("'-' reads the document from stdin, but stdin is a terminal; pipe a file in (e.g. < report.pdf)")
    try:
        return _read_bounded(stream, limit, "stdin")
    except OSError as exc:
        raise KvcliError(f"cannot read stdin: {_one_line(exc.strerror or exc)}") from None


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


def _pdf_pages(raw: bytes, display: str, password: str | None, warnings_: list[str], max_tokens: int) -> list[str]:
    """Extract each page's text; every pypdf failure becomes a KvcliError.

    pypdf's own safety limits stay in force except the tokens per content stream, raised
    to `max_tokens` (see PDF_BYTES_PER_TOKEN); a page beyond a limit is reported as such,
    not as damage, so the user knows the file is fine and what to do.
    """
    try:
        import pypdf
        from pypdf.errors import DependencyError, LimitReachedError
    except ImportError:  # pragma: no cover - pypdf is a dependency
        raise KvcliError(f"reading {display} needs pypdf: pip install pypdf") from None

    corrupt = f"{display} is corrupt or not a valid PDF"
    # pypdf decrypts AES only with the optional 'cryptography' package, and may find out
    # it needs it while opening the file, checking a password or reading a page.
    needs_crypto = f"{display} is encrypted with AES, which needs the 'cryptography' package: pip install cryptography"

    def beyond(where: str, exc: BaseException) -> str:
        return (
            f"{display}: {where} exceeds a safety limit of the PDF reader ({_brief(exc)}; the file may be fine); "
            f"extract its text (e.g. pdftotext) and pass the .txt, or raise {MAX_BYTES_ENV} (the token limit follows it)"
        )

    current = pypdf.get_configuration()
    tokens = max(current.stream_parsing_work_maximum_count, max_tokens)
    with _quiet_pypdf(), pypdf.apply_configuration(stream_parsing_work_maximum_count=tokens):
        try:
            reader = pypdf.PdfReader(io.BytesIO(raw))
        except DependencyError:
            raise KvcliError(needs_crypto) from None
        except LimitReachedError as exc:
            raise KvcliError(beyond("its structure", exc)) from None
        except Exception as exc:  # pypdf raises many types for broken files
            raise KvcliError(f"{corrupt} ({_brief(exc)})") from None

        if reader.is_encrypted:
            _decrypt(reader, display, password, needs_crypto)

        try:
            pages = list(reader.pages)
        except LimitReachedError as exc:
            raise KvcliError(beyond("its page tree", exc)) from None
        except Exception as exc:
            raise KvcliError(f"{corrupt} ({_brief(exc)})") from None

        texts: list[str] = []
        failed: list[int] = []
        limited: dict[int, BaseException] = {}
        for number, page in enumerate(pages, start=1):
            try:
                texts.append(page.extract_text() or "")
            except DependencyError:
                raise KvcliError(needs_crypto) from None
            except LimitReachedError as exc:
                limited[number] = exc
                texts.append("")
            except Exception:
                # One bad content stream should not cost the rest of the document.
                failed.append(number)
                texts.append("")

    if not pages:
        raise KvcliError(f"{corrupt} (it has no pages)")
    if limited and len(limited) + len(failed) == len(pages):
        first = min(limited)
        raise KvcliError(beyond(f"page {first}" if len(limited) == 1 else f"pages {_page_list(sorted(limited))}", limited[first]))
    if failed and len(failed) == len(pages):
        raise KvcliError(f"{corrupt} (no page could be read)")
    if limited:
        numbers = sorted(limited)
        which = f"pages {_page_list(numbers)}" if len(numbers) > 1 else f"page {numbers[0]}"
        warnings_.append(f"skipped {which}: beyond a safety limit of the PDF reader ({_brief(limited[numbers[0]])})")
    if failed:
        which = f"pages {_page_list(failed)}" if len(failed) > 1 else f"page {failed[0]}"
        warnings_.append(f"could not read the text of {which} (damaged)")
    blank = [n for n, text in enumerate(texts, start=1) if not text.strip() and n not in failed and n not in limited]
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
