"""Real English passages, built offline from the docstrings of Python's standard library.

The docstrings are read with ``ast`` from the standard library's source files (nothing is
imported, so nothing runs), cleaned of code examples, literal blocks and argument lists, and
cut into three kinds of passage of realistic sizes: single sentences (query-like), single
paragraphs, and sections of consecutive paragraphs (RAG-chunk-like). The same Python version,
size and seed give the same corpus.

``python bench/corpus.py --size 2000 --seed 0`` prints the corpus as JSON lines.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import re
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

# Directories of the standard library that hold tests, generated code or vendored packages.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "lib2to3", "encodings", "site-packages", "ensurepip", "turtledemo", "__pycache__"}
)
# Share of each kind of passage in a corpus.
DEFAULT_SHARES: Mapping[str, float] = {"sentence": 0.4, "paragraph": 0.45, "section": 0.15}
_MIN_WORDS = 6
_SECTION_WORDS = (80, 260)  # a section grows to at least the first and never past the second
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"!?-]")


@dataclass(frozen=True)
class Passage:
    """One passage of the corpus and where it comes from (``module.qualname``)."""

    text: str
    kind: str
    source: str


def stdlib_dir() -> Path:
    """The standard library's source directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def docstrings(root: Path) -> Iterator[tuple[str, str]]:
    """``(dotted name, cleaned docstring)`` of every module, class and function under ``root``, in path order."""
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        yield from _walk(tree, module)


def _walk(node: ast.AST, name: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield name, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _walk(child, f"{name}.{child.name}")


def prose_paragraphs(doc: str) -> list[str]:
    """The paragraphs of a docstring that read as English prose, each on one line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.strip("\n").splitlines()
        # Indented lines are code, literal blocks or argument lists; >>> and :param are examples and fields.
        if not lines or any(line[:1].isspace() or line.lstrip().startswith((">>>", ":", "..")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        words = text.split()
        if len(words) < _MIN_WORDS or text[-1] not in ".!?":
            continue
        if len(_PROSE_CHARS.findall(text)) < 0.92 * len(text) or sum(w.islower() for w in words) < 0.6 * len(words):
            continue
        paragraphs.append(text)
    return paragraphs


def passage_pools(root: Path | None = None) -> dict[str, list[Passage]]:
    """Every distinct sentence, paragraph and section under ``root`` (default: this Python's stdlib)."""
    pools: dict[str, list[Passage]] = {kind: [] for kind in DEFAULT_SHARES}
    seen: set[str] = set()

    def add(kind: str, text: str, source: str) -> None:
        key = " ".join(text.casefold().split())
        if key not in seen:
            seen.add(key)
            pools[kind].append(Passage(text, kind, source))

    for source, doc in docstrings(root or stdlib_dir()):
        paragraphs = prose_paragraphs(doc)
        for paragraph in paragraphs:
            sentences = _SENTENCE_END.split(paragraph)
            if len(sentences) > 1:
                add("paragraph", paragraph, source)
            for sentence in sentences:
                if len(sentence.split()) >= _MIN_WORDS:
                    add("sentence", sentence, source)
        section: list[str] = []
        for paragraph in paragraphs:
            if section and len(" ".join([*section, paragraph]).split()) > _SECTION_WORDS[1]:
                section = []
            section.append(paragraph)
            if len(section) > 1 and len(" ".join(section).split()) >= _SECTION_WORDS[0]:
                add("section", " ".join(section), source)
                section = []
    return pools


def build_corpus(size: int, seed: int = 0, shares: Mapping[str, float] = DEFAULT_SHARES) -> list[Passage]:
    """``size`` passages drawn with ``seed`` from the pools in the given shares, in shuffled order."""
    pools = passage_pools()
    rng = random.Random(seed)
    counts = {kind: round(size * share) for kind, share in shares.items()}
    counts[max(shares, key=lambda kind: shares[kind])] += size - sum(counts.values())
    corpus: list[Passage] = []
    for kind, count in counts.items():
        if count > len(pools[kind]):
            raise ValueError(f"asked for {count} {kind} passages, the standard library has {len(pools[kind])}")
        corpus.extend(rng.sample(pools[kind], count))
    rng.shuffle(corpus)
    return corpus


def main() -> None:
    """Print a corpus as JSON lines: ``{"text", "kind", "source"}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="number of passages")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()
    for passage in build_corpus(args.size, args.seed):
        print(json.dumps(asdict(passage), ensure_ascii=False))


if __name__ == "__main__":
    main()
