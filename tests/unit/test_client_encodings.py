"""Files in many encodings, built from real text (the standard library's documentation), read back exactly."""

from __future__ import annotations

import codecs
import csv
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.documents import (
    JAPANESE,
    LATIN_1,
    RUSSIAN,
    SHIFT_JIS_DECLARATION,
    UNICODE,
    UTF8_DECLARATION,
    WINDOWS_1252,
    page_of,
    text_of,
    xhtml,
)
from tritonrag.clients.extract import extract_file


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def reference_text(tmp_path: Path, module: ModuleType, odd: str) -> str:
    """What the extractor makes of the page declared and written as UTF-8: what every other encoding must give."""
    page = page_of(module, odd, UTF8_DECLARATION)
    [doc] = extract_file(write(tmp_path / "reference.html", page.encode("utf-8")))
    return doc.text


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("utf8-bom.txt", lambda text: codecs.BOM_UTF8 + text.encode("utf-8")),
        ("utf16-le-bom.md", lambda text: text.encode("utf-16")),  # the codec writes a mark (native order)
        ("utf16-be-bom.txt", lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be")),
        ("utf32-bom.txt", lambda text: text.encode("utf-32")),
        ("utf16-le-no-bom.txt", lambda text: text.encode("utf-16-le")),
    ],
)
def test_unicode_text_files_with_any_byte_order_mark(tmp_path: Path, name: str, encode: Callable[[str], bytes]) -> None:
    text = text_of(json, UNICODE)
    [doc] = extract_file(write(tmp_path / name, encode(text)))
    assert doc.text == text


@pytest.mark.parametrize(
    ("module", "odd", "encoding"),
    [(textwrap, WINDOWS_1252, "cp1252"), (csv, LATIN_1, "latin-1"), (json, UNICODE, "utf-8")],
)
def test_undeclared_text_files_are_detected(tmp_path: Path, module: ModuleType, odd: str, encoding: str) -> None:
    text = text_of(module, odd)
    [doc] = extract_file(write(tmp_path / "notes.txt", text.encode(encoding)))
    assert doc.text == text


@pytest.mark.parametrize(
    ("head", "odd", "encoding"),
    [
        ('<meta charset="ISO-8859-1">', LATIN_1, "latin-1"),
        ('<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">', WINDOWS_1252, "cp1252"),
        (SHIFT_JIS_DECLARATION, JAPANESE, "shift_jis"),
        ('<meta charset="koi8-r">', RUSSIAN, "koi8-r"),
        ("", WINDOWS_1252, "cp1252"),  # no declaration: detected
        (UTF8_DECLARATION, WINDOWS_1252, "cp1252"),  # mislabelled: the bytes are not UTF-8, detected
        ('<meta charset="utf-16">', UNICODE, "utf-8"),  # a declaration read as ASCII cannot mean UTF-16
    ],
)
def test_html_honours_its_declared_encoding(tmp_path: Path, head: str, odd: str, encoding: str) -> None:
    page = page_of(textwrap, odd, head)
    [doc] = extract_file(write(tmp_path / "page.html", page.encode(encoding)))
    assert doc.text == reference_text(tmp_path, textwrap, odd)
    assert odd in doc.text
    assert doc.metadata["title"] == "Python: module textwrap"


def test_an_xml_declaration_names_the_encoding_of_xhtml(tmp_path: Path) -> None:
    page = xhtml(page_of(csv, RUSSIAN, ""), "windows-1251")
    [doc] = extract_file(write(tmp_path / "page.xhtml", page.encode("cp1251")))
    assert doc.text == reference_text(tmp_path, csv, RUSSIAN)
    assert RUSSIAN in doc.text


def test_a_byte_order_mark_wins_over_a_declaration(tmp_path: Path) -> None:
    page = page_of(textwrap, UNICODE, '<meta charset="iso-8859-1">')
    [doc] = extract_file(write(tmp_path / "page.htm", page.encode("utf-16")))
    assert doc.text == reference_text(tmp_path, textwrap, UNICODE)
