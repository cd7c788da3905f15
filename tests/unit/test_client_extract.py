"""Text extraction from files, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tritonrag.clients.extract import ExtractionError, extract_file, extract_paths, iter_files


def pdf_bytes(pages: list[str], title: str | None = None) -> bytes:
    """A minimal PDF with one line of Helvetica text per page (empty string: a blank page)."""
    n = len(pages)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n)) + b"] /Count %d >>" % n,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    if title:
        objects.append(f"<< /Title ({title}) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    info = b" /Info %d 0 R" % len(objects) if title else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, info, xref)
    return bytes(out)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_text_and_markdown_keep_their_text(tmp_path: Path) -> None:
    md = "# Title\n\nSome *markdown* with `code`.\n\n- a list\n"
    [doc] = extract_file(write(tmp_path / "notes.md", md))
    assert doc.id == (tmp_path / "notes.md").as_posix()
    assert doc.text == md
    assert doc.metadata == {"source": doc.id}
    [doc] = extract_file(write(tmp_path / "plain.TXT", "\ufeffhello there"))
    assert doc.text == "hello there"  # the byte-order mark is not text


def test_html_gives_visible_text_and_title(tmp_path: Path) -> None:
    html = """<!doctype html><html><head><title>The  Page</title><style>p { color: red }</style>
    <script>var hidden = "no";</script></head>
    <body><h1>Heading</h1><p>First   paragraph with <b>bold</b> &amp; entities.</p>
    <noscript>enable js</noscript><ul><li>one</li><li>two</li></ul><script>alert(1)</script>
    <div>Last<br>line</div></body></html>"""
    [doc] = extract_file(write(tmp_path / "page.html", html))
    assert doc.text == "Heading\n\nFirst paragraph with bold & entities.\n\none\n\ntwo\n\nLast\nline"
    assert doc.metadata == {"source": doc.id, "title": "The Page"}


def test_html_leaves_navigation_banners_and_page_footers_out(tmp_path: Path) -> None:
    html = """<html><head><title>Guide</title><body>
    <header><a href="/">Home</a> <div role="search"><input name="q"> Search</div></header>
    <div role="navigation"><div><a href="a.html">Previous</a></div><div>Next</div></div>
    <main><article><header><h1>Chapter one</h1></header><p>Body text <svg><title>icon</title></svg>here.</p>
    <nav><ul><li>In this chapter</li></ul><script>toc()</script></nav><aside>Kept: a note inside the article.</aside>
    </article></main><aside>Related pages</aside><footer>© 2026 Site</footer></body></html>"""
    [doc] = extract_file(write(tmp_path / "guide.html", html))
    assert doc.text == "Chapter one\n\nBody text here.\n\nKept: a note inside the article."
    assert doc.metadata["title"] == "Guide"
    menu = "<html><body><nav><ul><li>Alpha</li><li>Beta</li></ul><script>menu()</script></nav></body></html>"
    [doc] = extract_file(write(tmp_path / "menu.html", menu))
    assert doc.text == "Alpha\n\nBeta"  # navigation is all there is: kept


def test_json_document_list_and_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docs.json",
        json.dumps(
            [
                {"id": "a", "text": "Alpha", "metadata": {"lang": "en", "year": 2024}},
                {"text": "Beta"},
                "Gamma as a plain string",
                {"id": 7, "text": "Delta"},
            ]
        ),
    )
    docs = extract_file(path)
    source = path.as_posix()
    assert [d.id for d in docs] == ["a", f"{source}#1", f"{source}#2", "7"]
    assert docs[0].metadata == {"source": source, "lang": "en", "year": 2024}
    assert docs[2].text == "Gamma as a plain string"
    [single] = extract_file(write(tmp_path / "one.json", json.dumps({"text": "Only one"})))
    assert single.id == (tmp_path / "one.json").as_posix()


def test_jsonl_one_record_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "docs.jsonl", '{"id": "x", "text": "first"}\n\n"second"\n{"text": "third"}\n')
    docs = extract_file(path)
    assert [d.id for d in docs] == ["x", f"{path.as_posix()}#3", f"{path.as_posix()}#4"]
    assert [d.text for d in docs] == ["first", "second", "third"]


def test_pdf_pages_and_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "paper.pdf", pdf_bytes(["Hello from page one", "", "Page three text"], title="A Paper"))
    [doc] = extract_file(path)
    assert doc.text == "Hello from page one\n\nPage three text"
    assert doc.metadata == {"source": path.as_posix(), "pages": 3, "title": "A Paper"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "   \n", r"empty\.txt: has no text"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, r"binary\.txt: is not text"),
        ("broken.json", '{"text": ', r"broken\.json: invalid JSON at line 1"),
        ("list.json", "[]", r"list\.json: the list holds no documents"),
        ("number.json", "[1]", r"number\.json \[0\]: a document is a string or an object, not int"),
        ("keys.json", '{"body": "x"}', r"keys\.json: unknown keys \['body'\]"),
        ("notext.json", '{"id": "a"}', r"notext\.json: 'text' is missing"),
        ("meta.json", '{"text": "x", "metadata": {"a": {"b": 1}}}', r"meta\.json: metadata\.a"),
        ("badid.json", '{"id": "", "text": "x"}', r"badid\.json: id: String should have at least 1 character"),
        ("lines.jsonl", '"ok"\n{"text": \n', r"lines\.jsonl:2: invalid JSON"),
        ("blank.jsonl", "\n\n", r"blank\.jsonl: has no documents"),
        ("scan.pdf", pdf_bytes(["", ""]), r"scan\.pdf: the PDF has no extractable text"),
        ("junk.pdf", b"%PDF-1.4 not really", r"junk\.pdf: not a readable PDF"),
        ("image.png", b"\x89PNG", r"image\.png: unsupported file type \.png"),
    ],
)
def test_bad_files_are_named_in_the_error(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    with pytest.raises(ExtractionError, match=message):
        extract_file(write(tmp_path / name, content))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExtractionError, match=r"nope\.txt: cannot be read"):
        extract_file(tmp_path / "nope.txt")


def test_directories_are_walked_and_bad_files_do_not_stop_the_batch(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "sub" / "a.md", "ay")
    write(root / "sub" / "bad.json", "{")
    write(root / "dupe.jsonl", '{"id": "same", "text": "one"}\n{"id": "same", "text": "two"}\n')
    write(root / ".hidden" / "secret.txt", "hidden")
    write(root / ".dot.txt", "hidden")
    write(root / "image.png", b"\x89PNG")
    extra = write(tmp_path / "extra.html", "<p>extra</p>")

    assert [p.name for p in iter_files([root, extra])] == ["b.txt", "dupe.jsonl", "a.md", "bad.json", "extra.html"]
    result = extract_paths([root, extra])
    assert [d.text for d in result.documents] == ["bee", "one", "ay", "extra"]
    assert result.files == 4
    assert [(e.path.name, e.error.split(": ", 1)[1]) for e in result.errors] == [
        ("dupe.jsonl", f"document id 'same' was already read from {root / 'dupe.jsonl'}; skipped"),
        ("bad.json", "invalid JSON at line 1 column 2: Expecting property name enclosed in double quotes"),
    ]
