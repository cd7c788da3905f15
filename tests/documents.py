"""Real text in many encodings for ingestion tests: the standard library's documentation, rendered by pydoc
as plain text and as HTML pages, with characters of each encoding's repertoire woven in."""

from __future__ import annotations

import codecs
import importlib
import pydoc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from tritonrag.clients.wire.schema import DocumentIn

# Odd characters for each repertoire: what Latin-1 holds, what windows-1252 adds, and beyond.
LATIN_1 = "Ça coûte 12 £ ? Non : « naïve façade », Straße, Ñandú, ¿qué?, 25 °C, © Æsir Øresund"
WINDOWS_1252 = f"{LATIN_1} — “quoted” \u2018single\u2019 … 30 € œuvre Š™"
UNICODE = f"{WINDOWS_1252} 日本語のテキスト、中文文本 한국어 Ελληνικά Кириллица 🚀🐍 e\u0301"
RUSSIAN = "Съешь же ещё этих мягких французских булок, да выпей чаю."
JAPANESE = "いろはにほへと ちりぬるを わかよたれそ つねならむ。漢字とカタカナ。"

UTF8_DECLARATION = '<meta charset="utf-8">'


def text_of(module: ModuleType, odd: str) -> str:
    """A module's plain-text documentation with ``odd`` characters woven in, as a text file holds it."""
    lines = pydoc.plain(pydoc.render_doc(module)).splitlines()  # as with renderer=pydoc.plaintext
    return "\n".join(f"{line} {odd}" if n % 40 == 3 else line for n, line in enumerate(lines)) + f"\n{odd}\n"


def page_of(module: ModuleType, odd: str, head: str) -> str:
    """A module's HTML documentation page with ``odd`` paragraphs; ``head`` replaces its charset declaration."""
    html = pydoc.HTMLDoc()
    page = html.page(pydoc.describe(module), f"<p>{odd}</p>{html.document(module)}<p>{odd}</p>")
    if UTF8_DECLARATION not in page:
        raise AssertionError(f"pydoc's page no longer declares {UTF8_DECLARATION}")
    return page.replace(UTF8_DECLARATION, head)


def xhtml(page: str, encoding: str) -> str:
    """``page`` as XHTML whose XML declaration names ``encoding``."""
    return page.replace("<!DOCTYPE html>", f'<?xml version="1.0" encoding="{encoding}"?>')


REFERENCES = "xmlcharrefreplace"
SHIFT_JIS_DECLARATION = "<meta http-equiv=Content-Type content='text/html;charset=Shift_JIS'>"

# A file suffix, and the file's bytes for a module. Pages write what their encoding lacks as character
# references, as HTML tools do; the legacy text file has a replacement character instead.
VARIANTS: list[tuple[str, Callable[[ModuleType], bytes]]] = [
    (".html", lambda m: page_of(m, LATIN_1, '<meta charset="ISO-8859-1">').encode("latin-1", REFERENCES)),
    (".html", lambda m: page_of(m, WINDOWS_1252, "").encode("cp1252", REFERENCES)),
    (".htm", lambda m: page_of(m, JAPANESE, SHIFT_JIS_DECLARATION).encode("shift_jis", REFERENCES)),
    (".html", lambda m: page_of(m, RUSSIAN, '<meta charset="koi8-r">').encode("koi8-r", REFERENCES)),
    (".xhtml", lambda m: xhtml(page_of(m, RUSSIAN, ""), "windows-1251").encode("cp1251", REFERENCES)),
    (".html", lambda m: page_of(m, UNICODE, UTF8_DECLARATION).encode("utf-16")),
    (".md", lambda m: text_of(m, UNICODE).encode("utf-8")),
    (".txt", lambda m: codecs.BOM_UTF8 + text_of(m, UNICODE).encode("utf-8")),
    (".md", lambda m: text_of(m, UNICODE).encode("utf-16")),
    (".txt", lambda m: text_of(m, WINDOWS_1252).encode("cp1252", "replace")),
]


# Twenty modules whose documentation, 1 to 5 thousand characters, fits a request of 64 KiB.
SMALL_MODULES = [
    *("html", "keyword", "colorsys", "quopri", "stringprep", "linecache", "reprlib", "glob", "token", "fnmatch"),
    *("shlex", "bisect", "cmath", "pprint", "heapq", "warnings", "hmac", "sched", "copy", "string"),
]


def mixed_corpus(folder: Path, modules: list[str]) -> list[Path]:
    """One file per module and variant in turn (so every encoding appears), and two files without text:
    the files with text, whose ids the ingested documents get."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, name in enumerate(modules):
        suffix, build = VARIANTS[index % len(VARIANTS)]
        path = folder / f"{index:02d}-{name}{suffix}"
        path.write_bytes(build(importlib.import_module(name)))
        files.append(path)
    (folder / "blank.md").write_text(" \n\n")
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return files


# Modules whose pydoc pages make a few hundred documents of real text.
PYDOC_MODULES = [
    *SMALL_MODULES,
    *("json", "csv", "textwrap", "difflib", "functools", "base64", "zlib", "fractions", "statistics", "random"),
    *("collections", "pathlib", "argparse", "logging", "datetime", "decimal", "shutil", "tempfile", "itertools"),
    *("tarfile", "zipfile", "sqlite3", "calendar", "configparser", "enum", "inspect", "locale", "operator"),
]


def pydoc_documents(per_module: int = 12, size: int = 1500) -> list[DocumentIn]:
    """Pieces of up to ``size`` characters of the standard library's pydoc pages, cut at lines: real text of a
    realistic size, the first ``per_module`` pieces of each module of ``PYDOC_MODULES``."""
    documents = []
    for name in PYDOC_MODULES:
        pieces, piece = [], ""
        for line in text_of(importlib.import_module(name), "").splitlines():
            if len(piece) + len(line) >= size and piece.strip():
                pieces.append(piece)
                piece = ""
            piece += line[:size] + "\n"
        pieces.append(piece)
        documents += [DocumentIn(id=f"{name}-{n}", text=text) for n, text in enumerate(pieces[:per_module])]
    return documents
