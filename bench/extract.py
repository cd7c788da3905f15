"""HTML → text: the project's extractor against maintained libraries, on real documentation pages.

Pages: the HTML documentation installed on this machine, by site generator (a site whose folder is
missing is skipped): mdBook (the Rust book, reference, and the Cargo, Nomicon, rustc and edition
guides) and rustdoc (Rust's ``std``) from the stable toolchain under ``~/.rustup``, the Node.js
API reference, npm's command reference, Valgrind's manual (DocBook XSL) and libxslt's site (a table
layout of the 2000s, declared ISO-8859-1). Each site's files (over 5 KB, sorted by path) are shuffled
with ``--seed`` and the first ``--pages`` whose main content holds 20 words or more are kept (fewer
are pages of another layout, such as redirects). Every page is decoded once, as ingestion decodes it
(``clients.extract``: byte-order mark, declared charset, UTF-8, detection), and every extractor gets
the same text; only the HTML → text step is timed.

Ground truth: the page's main content, picked by the generator's own markup (mdBook's ``<main>``,
rustdoc's ``#main-content``, Node's ``#apicontent``, npm's title and ``#_content``, DocBook's body
without its navigation tables, libxslt's content cell), its text read with lxml (no script, style,
noscript, template or svg; block elements apart). Words are lower-cased ``\\w+`` tokens, counted with
their repeats:

* recall: the share of the ground truth's words that the output holds;
* precision: the share of the output's words that belong to the ground truth;
* failed or empty: an exception, or no words (recall 0, and no precision);
* ms per page: the mean wall time of the HTML → text step (after one untimed call).

Recall and precision are means over the pages (each page weighs the same), F1 their harmonic mean;
one table for all pages, one per site. Extractors:

* ``tritonrag``: ``clients.extract``'s HTML step (``html.parser``, navigation, banners and page
  footers left out by their elements and ARIA roles, unless they are all the text there is);
* ``selectolax (same rules)``: those rules on selectolax's lexbor DOM (a C parser);
* ``trafilatura``: ``trafilatura.extract`` with tables, without comments (its defaults), and with
  ``favor_recall``.

``.venv/bin/python bench/extract.py`` (``--pages 40 --seed 0``; the libraries are in the ``dev`` extras).
The report is markdown on stdout, progress on stderr; nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lxml.html
import lxml.html.defs
import trafilatura
from selectolax.lexbor import LexborHTMLParser, LexborNode
from stack import machine, markdown_table, progress

from tritonrag.clients.extract import _decode, _html_text, _tidy
from tritonrag.clients.extract import _VisibleText as Rules

MIN_BYTES = 5 * 1024
RUST_DOCS = sorted(Path.home().glob(".rustup/toolchains/stable-*/share/doc/rust/html"))
RUST_HTML = RUST_DOCS[-1] if RUST_DOCS else Path("/nonexistent")


@dataclass(frozen=True)
class Site:
    """A folder of pages by one generator, and the XPath of their main content."""

    name: str
    root: Path
    patterns: tuple[str, ...]  # globs under root
    content: str  # XPath: the elements whose text is the main content
    remove: str = ""  # XPath: elements inside it that are not


SITES = (
    Site(
        "mdBook",
        RUST_HTML,
        tuple(f"{book}/**/*.html" for book in ("book", "reference", "cargo", "nomicon", "rustc", "edition-guide")),
        "//main",
    ),
    Site("rustdoc", RUST_HTML, ("std/**/*.html",), "//section[@id='main-content']"),
    Site("Node.js API", Path("/usr/share/doc/nodejs/api"), ("*.html",), "//div[@id='apicontent']"),
    Site(
        "npm docs",
        Path("/usr/lib/node_modules/npm/docs/output"),
        ("**/*.html",),
        "//header[@class='title'] | //div[@id='_content']",
    ),
    Site(
        "DocBook (Valgrind)",
        Path("/usr/share/doc/valgrind/html"),
        ("*.html",),
        "//body",
        "//table[starts-with(@summary, 'Navigation')]",
    ),
    Site(
        "table layout (libxslt)",
        Path("/usr/share/doc/libxslt1-dev/html"),
        ("*.html",),
        "//td[@valign='top' and not(@width) and not(ancestor::td[@valign='top'])]",
    ),
)

_WORD = re.compile(r"\w+")
# The ground truth's own reading of a page, apart from any extractor's: elements that hold no visible text,
# and those that start a line (lxml's block elements, HTML5's sectioning elements and line breaks).
_TRUTH_UNSEEN = ("script", "style", "noscript", "template", "svg")
_TRUTH_BLOCKS = lxml.html.defs.block_tags | {"article", "aside", "br", "details", "figcaption", "figure", "footer"}
_TRUTH_BLOCKS |= {"header", "main", "nav", "section", "summary"}


@dataclass(frozen=True)
class Page:
    site: str
    path: Path
    html: str
    truth: Counter[str]


def words(text: str) -> Counter[str]:
    """The lower-cased word tokens of ``text``, with their counts."""
    return Counter(_WORD.findall(text.lower()))


def truth_text(html: str, site: Site) -> str:
    """The text of the page's main content, block elements on lines of their own; "" without one."""
    tree = lxml.html.document_fromstring(html.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
    unseen = [f"//{tag}" for tag in _TRUTH_UNSEEN] + ([site.remove] if site.remove else [])
    for element in tree.xpath(" | ".join(unseen)):
        element.drop_tree()
    for element in tree.iter(*_TRUTH_BLOCKS):
        element.text = "\n" + (element.text or "")
        element.tail = "\n" + (element.tail or "")
    return "\n".join(element.text_content() for element in tree.xpath(site.content))


def site_pages(site: Site, count: int, seed: int) -> list[Page]:
    """Up to ``count`` pages of ``site`` with a main content, sampled from its sorted files."""
    paths = sorted({p for pattern in site.patterns for p in site.root.glob(pattern) if p.stat().st_size >= MIN_BYTES})
    random.Random(f"{seed}:{site.name}").shuffle(paths)
    pages: list[Page] = []
    for path in paths:
        if len(pages) == count:
            break
        html = _decode(path.read_bytes(), path.as_posix(), declared=True)
        truth = words(truth_text(html, site))
        if sum(truth.values()) >= 20:  # a page of that generator's layout, with text to find
            pages.append(Page(site.name, path, html, truth))
    return pages


def tritonrag_text(html: str) -> str:
    return _html_text(html)[0]


_SELECTOLAX_BOILERPLATE = ", ".join(
    ["nav", *sorted(Rules._PAGE_LANDMARKS)] + [f'[role="{role}" i]' for role in sorted(Rules._BOILERPLATE_ROLES)]
)


def selectolax_text(html: str) -> str:
    """``tritonrag``'s rules on lexbor's DOM: unseen elements dropped, then navigation, and banners and
    footers outside sectioning elements, unless they are all the text there is."""
    tree = LexborHTMLParser(html)
    tree.strip_tags(sorted(Rules._HIDDEN - {"head"}), recursive=True)
    body = tree.body
    if body is None:
        return ""
    for block in body.css(", ".join(sorted(Rules._BLOCKS))):
        block.insert_before("\n")
        block.insert_after("\n")
    everything = _tidy(body.text())
    for node in reversed(body.css(_SELECTOLAX_BOILERPLATE)):  # innermost first: no node outlives its parent
        if node.tag not in Rules._PAGE_LANDMARKS or not _in_sectioning(node):
            node.decompose()
    return _tidy(body.text()) or everything


def _in_sectioning(node: LexborNode) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.tag in Rules._SECTIONING:
            return True
        parent = parent.parent
    return False


def trafilatura_text(favor_recall: bool) -> Callable[[str], str]:
    def extract(html: str) -> str:
        return trafilatura.extract(html, favor_recall=favor_recall) or ""

    return extract


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "tritonrag": tritonrag_text,
    "selectolax (same rules)": selectolax_text,
    "trafilatura": trafilatura_text(favor_recall=False),
    "trafilatura favor_recall": trafilatura_text(favor_recall=True),
}


@dataclass
class Scores:
    recall: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0
    pages: int = 0

    def add(self, truth: Counter[str], output: str | None, seconds: float) -> None:
        self.pages += 1
        self.seconds += seconds
        found = words(output or "")
        total = sum(found.values())
        overlap = sum((found & truth).values())
        self.recall.append(overlap / sum(truth.values()))
        if total:
            self.precision.append(overlap / total)
        else:
            self.failed += 1

    def row(self, label: str) -> list[str]:
        recall = statistics.fmean(self.recall)
        precision = statistics.fmean(self.precision) if self.precision else 0.0
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        ms = 1000 * self.seconds / self.pages
        return [label, str(self.pages), str(self.failed), f"{recall:.3f}", f"{precision:.3f}", f"{f1:.3f}", f"{ms:.1f}"]


def measure(pages: Sequence[Page]) -> dict[tuple[str, str], Scores]:
    """Scores by (extractor, site), and by (extractor, "all")."""
    scores: dict[tuple[str, str], Scores] = {}
    for name, extract in EXTRACTORS.items():
        progress(f"{name}: {len(pages)} pages")
        extract(pages[0].html)  # imports and first-call set-up are not timed
        for page in pages:
            start = time.perf_counter()
            try:
                output: str | None = extract(page.html)
            except Exception as exc:  # a library's failure is a result
                progress(f"  {name} failed on {page.path}: {exc!r}")
                output = None
            seconds = time.perf_counter() - start
            for site in (page.site, "all"):
                scores.setdefault((name, site), Scores()).add(page.truth, output, seconds)
    return scores


HEADER = ["extractor", "pages", "failed or empty", "recall", "precision", "F1", "ms/page"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40, help="pages sampled per site (at most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pages: list[Page] = []
    for site in SITES:
        if not site.root.is_dir():
            progress(f"{site.name}: {site.root} is missing; skipped")
            continue
        found = site_pages(site, args.pages, args.seed)
        progress(f"{site.name}: {len(found)} pages from {site.root}")
        pages += found
    scores = measure(pages)

    measured = [site.name for site in SITES if any(page.site == site.name for page in pages)]
    print(f"Machine: {machine()}\n")
    print(f"All pages ({len(pages)}, {len(measured)} sites; --pages {args.pages} --seed {args.seed}):\n")
    print(markdown_table(HEADER, [scores[name, "all"].row(name) for name in EXTRACTORS]))
    for site_name in measured:
        print(f"\n{site_name}:\n")
        print(markdown_table(HEADER, [scores[name, site_name].row(name) for name in EXTRACTORS]))


if __name__ == "__main__":
    main()
