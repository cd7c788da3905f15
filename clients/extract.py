"""Documents out of files: .txt .md .html .json .jsonl .pdf → ``DocumentIn``.

A document's id is its file's path as given (directories are walked, their files named below
them); a file that holds several documents adds ``#<index>`` (the list index in .json, the line
number in .jsonl) unless a record brings its own ``id``. Metadata starts as ``{"source": path}``.
A file that cannot be read is reported with its path and the reason; the other files go on.

Text files are decoded by their byte-order mark, else (HTML) by their declared encoding, else as
UTF-8 when they are valid UTF-8, else by the encoding ``charset-normalizer`` detects. HTML keeps
the text a reader sees, without navigation, banners and page footers.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import charset_normalizer
from charset_normalizer.md import mess_ratio
from pydantic import ValidationError
from pypdf import PdfReader

from tritonrag.clients.wire.schema import DocumentIn, Metadata

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".json", ".jsonl", ".pdf"}


class ExtractionError(ValueError):
    """A file that yields no documents; the message names the file."""


@dataclass(frozen=True)
class FileError:
    path: Path
    error: str


@dataclass
class Extraction:
    """What a batch of paths yielded: the documents, and the files (or records) that failed."""

    documents: list[DocumentIn] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    files: int = 0  # files that yielded documents


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path that is a file, and the supported, non-hidden files under each directory, sorted."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        for child in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
            if child.is_file() and not hidden and child.suffix.lower() in SUPPORTED_SUFFIXES:
                yield child


def extract_paths(paths: Iterable[Path]) -> Extraction:
    """Extract every file under ``paths``; bad files and repeated ids become errors, not exceptions."""
    result = Extraction()
    origin: dict[str, Path] = {}
    for path in iter_files(paths):
        try:
            documents = extract_file(path)
        except ExtractionError as exc:
            result.errors.append(FileError(path, str(exc)))
            continue
        result.files += 1
        for document in documents:
            if document.id in origin:
                error = f"{path}: document id {document.id!r} was already read from {origin[document.id]}; skipped"
                result.errors.append(FileError(path, error))
                continue
            origin[document.id] = path
            result.documents.append(document)
    return result


def extract_file(path: Path) -> list[DocumentIn]:
    """The documents in one file; raises ``ExtractionError`` naming the file."""
    suffix = path.suffix.lower()
    source = path.as_posix()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = " ".join(sorted(SUPPORTED_SUFFIXES))
        raise ExtractionError(f"{source}: unsupported file type {suffix or '(none)'}; supported: {supported}")
    try:
        if suffix == ".pdf":
            return [_document(source, *_pdf_text(path), {"source": source})]
        text = _decode(path.read_bytes(), source, declared=suffix in HTML_SUFFIXES)
        if suffix in TEXT_SUFFIXES:
            return [_document(source, text, {}, {"source": source})]
        if suffix in HTML_SUFFIXES:
            return [_document(source, *_html_text(text), {"source": source})]
        if suffix == ".json":
            return _json_documents(source, text)
        return _jsonl_documents(source, text)
    except ExtractionError:
        raise
    except OSError as exc:
        raise ExtractionError(f"{source}: cannot be read: {exc.strerror or exc}") from exc


_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_XML_DECLARATION = re.compile(rb"""<\?xml\s[^>]*?encoding\s*=\s*["']([\w.:-]+)""")
# <meta charset="x"> and <meta http-equiv="Content-Type" content="text/html; charset=x">
_META_CHARSET = re.compile(rb"""<meta\s[^>]*?charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
_DECLARATION_BYTES = 4096  # where a declaration is looked for: the start of the file (the head of a page)
_WINDOWS_1252 = "cp1252"
# As browsers do (WHATWG Encoding): pages labelled Latin-1 or ASCII are windows-1252, their superset.
_READ_AS_WINDOWS_1252 = frozenset({"iso8859-1", "ascii"})


def _decode(raw: bytes, source: str, declared: bool = False) -> str:
    """The text of a file's bytes: by its byte-order mark, else its declared encoding (``declared``: an XML
    declaration or an HTML ``<meta>`` charset), else as UTF-8, else in the detected encoding. A label the
    bytes do not fit is passed over; ``ExtractionError`` when no encoding fits (a binary file)."""
    label = next((codec for mark, codec in _BOMS if raw.startswith(mark)), None)
    if label is None and declared:
        label = _declared_codec(raw[:_DECLARATION_BYTES])
    utf8 = None if b"\x00" in raw else "utf-8"  # NUL bytes: UTF-16 without a mark, or binary
    for codec in (label, utf8):
        if codec is not None:
            try:
                return raw.decode(codec)
            except UnicodeDecodeError:
                pass
    text = _detected_text(raw)
    if text is None:
        raise ExtractionError(f"{source}: is not text (no character encoding fits its bytes)")
    return text


def _declared_codec(head: bytes) -> str | None:
    """The Python codec of the encoding that ``head`` declares; None without a known one."""
    found = _XML_DECLARATION.match(head) or _META_CHARSET.search(head)
    if found is None:
        return None
    try:
        name = codecs.lookup(found.group(1).decode("ascii")).name
    except LookupError:
        return None
    if name.startswith(("utf-16", "utf-32")):  # a declaration read as ASCII: the bytes are not UTF-16/32
        return "utf-8"
    return _WINDOWS_1252 if name in _READ_AS_WINDOWS_1252 else name


def _detected_text(raw: bytes) -> str | None:
    """The text in the encoding ``charset-normalizer`` finds most plausible, or in windows-1252 (the legacy
    default, which the detector loses to look-alikes such as cp850 on mostly-ASCII text) when that reads with
    no more mess; None when nothing fits."""
    best = charset_normalizer.from_bytes(raw).best()
    if best is None:
        return None
    detected = str(best)
    try:
        western = raw.decode(_WINDOWS_1252)
    except UnicodeDecodeError:
        return detected
    return western if mess_ratio(western, math.inf) <= mess_ratio(detected, math.inf) else detected


def _document(doc_id: str, text: str, metadata: Metadata, base: Metadata, where: str = "") -> DocumentIn:
    """A validated document; ``where`` locates a record inside its file in error messages."""
    source = str(base["source"])
    if not text.strip():
        raise ExtractionError(f"{source}{where}: has no text")
    try:
        return DocumentIn(id=doc_id, text=text, metadata={**base, **metadata})
    except ValidationError as exc:
        raise ExtractionError(f"{source}{where}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors())


def _record(source: str, value: Any, default_id: str, where: str) -> DocumentIn:
    """One JSON record: a string, or an object with ``text`` and optional ``id`` and ``metadata``."""
    base: Metadata = {"source": source}
    if isinstance(value, str):
        return _document(default_id, value, {}, base, where)
    if not isinstance(value, dict):
        raise ExtractionError(f"{source}{where}: a document is a string or an object, not {type(value).__name__}")
    unknown = sorted(set(value) - {"id", "text", "metadata"})
    if unknown:
        raise ExtractionError(f"{source}{where}: unknown keys {unknown}; a document has id, text and metadata")
    if not isinstance(value.get("text"), str):
        raise ExtractionError(f"{source}{where}: 'text' is missing or not a string")
    metadata = value.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ExtractionError(f"{source}{where}: 'metadata' is not an object")
    doc_id = value.get("id", default_id)
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    return _document(doc_id, value["text"], metadata, base, where)


def _json_documents(source: str, text: str) -> list[DocumentIn]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExtractionError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, list):
        return [_record(source, data, source, "")]
    if not data:
        raise ExtractionError(f"{source}: the list holds no documents")
    return [_record(source, value, f"{source}#{index}", f" [{index}]") for index, value in enumerate(data)]


def _jsonl_documents(source: str, text: str) -> list[DocumentIn]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExtractionError(f"{source}:{number}: invalid JSON at column {exc.colno}: {exc.msg}") from exc
        documents.append(_record(source, value, f"{source}#{number}", f":{number}"))
    if not documents:
        raise ExtractionError(f"{source}: has no documents")
    return documents


def _pdf_text(path: Path) -> tuple[str, Metadata]:
    """The text of every page, pages separated by a blank line; metadata: pages and title."""
    source = path.as_posix()
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError(f"{source}: the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except ExtractionError:
        raise
    except Exception as exc:  # pypdf raises many kinds on malformed files
        raise ExtractionError(f"{source}: not a readable PDF: {exc}") from exc
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise ExtractionError(f"{source}: the PDF has no extractable text (a scan needs OCR first)")
    metadata: Metadata = {"pages": len(pages)}
    if title:
        metadata["title"] = str(title)
    return text, metadata


def _html_text(html: str) -> tuple[str, Metadata]:
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    metadata: Metadata = {"title": parser.title} if parser.title else {}
    return parser.text(), metadata


class _Region:
    """An element whose content is left out, followed to its end tag through nested elements of its name."""

    def __init__(self) -> None:
        self.tag: str | None = None
        self._depth = 0

    def begin(self, tag: str) -> None:
        self.tag, self._depth = tag, 1

    def nest(self, tag: str) -> None:
        if tag == self.tag:
            self._depth += 1

    def close(self, tag: str) -> None:
        if tag == self.tag:
            self._depth -= 1
            if not self._depth:
                self.tag = None


class _VisibleText(HTMLParser):
    """The text a reader sees: no script, style or head; block elements start new lines.

    Navigation (``<nav>``, ARIA navigation, search and menu roles) and the page's banner and footer
    (``<header>``, ``<footer>``, ``<aside>`` outside ``<article>``, ``<main>`` and ``<section>``, and
    their ARIA roles) are boilerplate, left out unless they are all the text there is.
    """

    _HIDDEN = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    _BLOCKS = frozenset(
        "address article aside blockquote br dd details div dl dt fieldset figcaption figure footer form h1 h2 h3 "  # noqa: SIM905
        "h4 h5 h6 header hr li main nav ol p pre section summary table tbody thead tr td th ul".split()
    )
    _VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())  # noqa: SIM905
    _SECTIONING = frozenset({"article", "main", "section"})
    _PAGE_LANDMARKS = frozenset({"header", "footer", "aside"})  # boilerplate outside sectioning elements
    _BOILERPLATE_ROLES = frozenset({"navigation", "banner", "contentinfo", "search", "menu", "menubar"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []  # the text without boilerplate
        self._all_parts: list[str] = []  # with it
        self._hidden = _Region()
        self._boilerplate = _Region()
        self._sectioning_depth = 0
        self._in_title = False
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and self._hidden.tag == "head":  # the end tag of <head> is optional
            self._hidden.tag = None
        if tag == "title" and self._hidden.tag in (None, "head"):  # not an <svg>'s
            self._in_title = True
        if self._hidden.tag is not None:
            self._hidden.nest(tag)
            return
        if tag in self._HIDDEN:
            self._hidden.begin(tag)
            return
        if tag in self._SECTIONING:
            self._sectioning_depth += 1
        if tag in self._BLOCKS:
            self._append("\n")
        if self._boilerplate.tag is not None:
            self._boilerplate.nest(tag)
        elif tag not in self._VOID and self._is_boilerplate(tag, attrs):
            self._boilerplate.begin(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._hidden.tag is not None:
            self._hidden.close(tag)
            return
        if tag in self._SECTIONING:
            self._sectioning_depth = max(0, self._sectioning_depth - 1)
        self._boilerplate.close(tag)
        if tag in self._BLOCKS:
            self._append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = " ".join(f"{self.title} {data}".split())
        elif self._hidden.tag is None:
            self._append(data)

    def _is_boilerplate(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        role = next((value for name, value in attrs if name == "role"), None) or ""
        if tag == "nav" or role.lower() in self._BOILERPLATE_ROLES:
            return True
        return tag in self._PAGE_LANDMARKS and not self._sectioning_depth

    def _append(self, text: str) -> None:
        self._all_parts.append(text)
        if self._boilerplate.tag is None:
            self._parts.append(text)

    def text(self) -> str:
        """Whitespace collapsed within lines; at most one blank line between blocks."""
        return _tidy("".join(self._parts)) or _tidy("".join(self._all_parts))


def _tidy(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()
