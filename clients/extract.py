"""Documents out of files: .txt .md .html .json .jsonl .pdf → ``DocumentIn``.

A document's id is its file's path as given (directories are walked, their files named below
them); a file that holds several documents adds ``#<index>`` (the list index in .json, the line
number in .jsonl) unless a record brings its own ``id``. Metadata starts as ``{"source": path}``.
A file that cannot be read is reported with its path and the reason; the other files go on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pypdf import PdfReader

from tritonrag.clients.wire.schema import DocumentIn, Metadata

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
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
        text = _read_text(path)
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


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionError(f"{path.as_posix()}: is not UTF-8 text (byte {exc.start})") from exc


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


class _VisibleText(HTMLParser):
    """The text a browser shows: no script, style or head; block elements start new lines."""

    _HIDDEN = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    _BLOCKS = frozenset(
        "address article aside blockquote br dd div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 "  # noqa: SIM905
        "h6 header hr li main nav ol p pre section table tbody thead tr td th ul".split()
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._hidden_depth = 0
        self._in_title = False
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag == "title":
            self._in_title = True
        if tag in self._BLOCKS:
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag == "title":
            self._in_title = False
        if tag in self._BLOCKS:
            self._parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = " ".join(f"{self.title} {data}".split())
        elif not self._hidden_depth:
            self._parts.append(data)

    def text(self) -> str:
        """Whitespace collapsed within lines; at most one blank line between blocks."""
        lines = [" ".join(line.split()) for line in "".join(self._parts).split("\n")]
        out: list[str] = []
        for line in lines:
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip()
