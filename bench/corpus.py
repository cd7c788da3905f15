"""Real text, built offline from Python's standard library: two corpora.

Passages (``build_corpus``): the docstrings are read with ``ast`` from the standard library's
source files (nothing is imported, so nothing runs), cleaned of code examples, literal blocks and
argument lists, and cut into three kinds of passage of realistic sizes: single sentences
(query-like), single paragraphs, and sections of consecutive paragraphs (RAG-chunk-like). The same
Python version, size and seed give the same corpus.

Long documents (``pydoc_documents``): the ``pydoc`` plain-text rendering of the standard library's
public modules, and of the public classes and functions they define, as ``help()`` shows them (a
few KB to several hundred KB each; code, signatures, tables and odd characters kept). Rendering
imports the modules, so it runs in a child process of the base interpreter (no site-packages, a fixed
environment and hash seed, argv and memory addresses scrubbed) whose output is cached in
``.cache/``. The same Python gives the same documents.

``python bench/corpus.py --size 2000 --seed 0`` prints the passages as JSON lines;
``python bench/corpus.py --pydoc --stats`` builds (or loads) the long documents and prints their
sizes and chunk counts under the default chunking.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
import os
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping, Sequence
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


# The long-document corpus: pydoc renderings. Bump the version when what is rendered changes.
PYDOC_CORPUS_VERSION = 2
PYDOC_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"
PYDOC_MIN_CHARS = 1_000  # about a KB at least: shorter renderings (most functions) are left out
# Never imported: they act on import (open a browser, print, touch the terminal or the source tree),
# need a display, or are tests, IDLE, codecs or installers rather than library documentation.
_PYDOC_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "tests",
        "idle_test",
        "ensurepip",
        "lib2to3",
        "readline",
        "rlcompleter",
        "encodings",
    }
)
# Memory addresses in reprs: "<function f at 0x7f...>", ctypes' "<PyDLL 'None', handle 7f...>".
_ADDRESS = re.compile(r"(?<= at )0x[0-9a-fA-F]+|(?<=, handle )[0-9a-fA-F]+(?=>)")
# The child's environment: fixed, so that the renderings do not depend on the caller's (``os.environ``,
# ``time.tzname`` and ``sys.flags`` appear in them; set and dict orders depend on the hash seed).
_PYDOC_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/nonexistent",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "TZ": "UTC",
    "PYTHONHASHSEED": "0",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "TERM": "dumb",
}


@dataclass(frozen=True)
class Document:
    """A pydoc rendering: ``id`` is ``<kind>:<dotted name>``; ``summary`` is the object's first docstring sentence."""

    id: str
    kind: str  # module, class or function
    text: str
    summary: str


def _public(name: str) -> bool:
    return not any(part.startswith("_") or part in _PYDOC_SKIP for part in name.split("."))


def _stdlib_modules(only: Sequence[str] | None) -> Iterator[object]:
    """Every importable public standard-library module and submodule, in name order (child process only)."""
    import importlib
    import pkgutil

    tops = sorted(name for name in (only or sys.stdlib_module_names) if _public(name))
    pending = list(reversed(tops))
    while pending:
        name = pending.pop()
        try:
            module = importlib.import_module(name)
        except Exception:  # another platform's module, a missing system library, ...
            continue
        yield module
        path = getattr(module, "__path__", None)
        if path is not None:
            subs = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(path))
            pending.extend(reversed([sub for sub in subs if _public(sub)]))


def _pydoc_worker(out_file: Path, only: Sequence[str] | None) -> None:
    """Render every module, and the public classes and functions each defines, into ``out_file`` (JSON lines)."""
    import pydoc
    import warnings

    warnings.simplefilter("ignore")
    # What sys's own rendering shows of this process: nothing that names a path of this run.
    sys.argv = ["python"]
    sys.orig_argv = ["python"]
    records: dict[str, dict[str, str]] = {}
    seen: set[int] = set()  # objects already rendered under another public name

    def add(kind: str, name: str, thing: object) -> None:
        if id(thing) in seen:
            return
        seen.add(id(thing))
        try:
            text = pydoc.render_doc(thing, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
            doc = inspect.getdoc(thing) or ""
        except Exception:  # a broken __doc__, a signature that fails, ...
            return
        identifier = f"{kind}:{name}"
        if identifier not in records:
            records[identifier] = {"id": identifier, "kind": kind, "text": _ADDRESS.sub("...", text), "doc": doc}

    for module in _stdlib_modules(only):
        module_name = module.__name__  # type: ignore[attr-defined]
        add("module", module_name, module)
        for attribute, value in sorted(vars(module).items()):
            # Defined here, or in a private (often C) module behind this one: io.BytesIO is _io's.
            origin = getattr(value, "__module__", None)
            if attribute.startswith("_") or not (origin == module_name or (origin or "x").startswith("_")):
                continue
            if inspect.isclass(value):
                add("class", f"{module_name}.{attribute}", value)
            elif inspect.isroutine(value):
                add("function", f"{module_name}.{attribute}", value)
    with out_file.open("w", encoding="utf-8") as out:
        for identifier in sorted(records):
            out.write(json.dumps(records[identifier], ensure_ascii=False) + "\n")


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence on one line ("" when it has none of 3 to 30 words)."""
    first = doc.strip().split("\n\n", 1)[0]
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", " ".join(first.split()), maxsplit=1)[0]
    return sentence if 3 <= len(sentence.split()) <= 30 else ""


def pydoc_cache_file() -> Path:
    """Where this Python's long-document corpus is cached: keyed by the interpreter's version and build."""
    key = f"{PYDOC_CORPUS_VERSION}|{sys.version}|{sys.base_prefix}|{PYDOC_MIN_CHARS}"
    return PYDOC_CACHE_DIR / f"pydoc-corpus-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl.gz"


def render_pydoc(only: Sequence[str] | None = None, timeout_s: float = 1800) -> list[Document]:
    """Render the corpus now, in a child process of the base interpreter (``only``: these top-level modules)."""
    interpreter = getattr(sys, "_base_executable", None) or sys.executable
    with tempfile.TemporaryDirectory(prefix="pydoc-corpus-") as work:
        out_file = Path(work) / "documents.jsonl"
        command = [interpreter, "-s", "-S", "-P", str(Path(__file__).resolve()), "--pydoc-worker", str(out_file)]
        command += list(only or [])
        done = subprocess.run(
            command,
            cwd=work,
            env=_PYDOC_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # modules may print when imported
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0 or not out_file.is_file():
            raise RuntimeError(f"rendering the pydoc corpus failed ({done.returncode}): {done.stderr[-2000:]}")
        rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    documents, seen = [], set()
    for row in rows:
        if len(row["text"]) < PYDOC_MIN_CHARS or row["text"] in seen:  # too short, or an alias's copy
            continue
        seen.add(row["text"])
        documents.append(Document(row["id"], row["kind"], row["text"], _first_sentence(row["doc"])))
    return documents


def pydoc_documents(rebuild: bool = False) -> list[Document]:
    """The long-document corpus in id order: read from the cache, rendered (about a minute) and cached if absent."""
    cache = pydoc_cache_file()
    if cache.is_file() and not rebuild:
        with gzip.open(cache, "rt", encoding="utf-8") as lines:
            return [Document(**json.loads(line)) for line in lines]
    print(f"rendering the pydoc corpus into {cache}", file=sys.stderr, flush=True)
    documents = render_pydoc()
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    with gzip.GzipFile(partial, "wb", mtime=0) as raw:
        for document in documents:
            raw.write((json.dumps(asdict(document), ensure_ascii=False) + "\n").encode("utf-8"))
    partial.replace(cache)
    return documents


def sample_documents(documents: Sequence[Document], count: int | None, seed: int = 0) -> list[Document]:
    """``count`` documents drawn with ``seed`` (all of them, in a shuffled order, when ``count`` is None)."""
    rng = random.Random(seed)
    return rng.sample(list(documents), len(documents) if count is None else min(count, len(documents)))


def corpus_digest(documents: Sequence[Document]) -> str:
    """A short digest of the documents' ids and texts: equal digests, equal corpora."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(f"{document.id}\0{document.text}\0".encode())
    return digest.hexdigest()[:16]


def describe_distribution(values: Sequence[float]) -> str:
    """``median / p90 / max`` of ``values``, as integers."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):,.0f} / {p90:,.0f} / {ordered[-1]:,.0f}"


def pydoc_stats(documents: Sequence[Document], chunk_counts: Sequence[int]) -> str:
    """Counts, characters and chunks per document (median / p90 / max), overall and by kind, as markdown."""
    lines = [
        "| documents | n | characters (median / p90 / max) | chunks (median / p90 / max) | chunks | MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ["all", "module", "class", "function"]:
        chosen = [i for i, d in enumerate(documents) if kind in ("all", d.kind)]
        if not chosen:
            continue
        chars = [len(documents[i].text) for i in chosen]
        chunks = [chunk_counts[i] for i in chosen]
        lines.append(
            f"| {kind} | {len(chosen):,} | {describe_distribution(chars)} | {describe_distribution(chunks)} "
            f"| {sum(chunks):,} | {sum(chars) / 1e6:.1f} |"
        )
    odd = sum(any(not (ch.isascii() and (ch.isprintable() or ch in "\n")) for ch in d.text) for d in documents)
    summaries = sum(bool(d.summary) for d in documents)
    lines.append(
        f"\n{odd:,} documents hold non-ASCII or control characters; {summaries:,} have a one-sentence summary "
        f"(the benchmark's search queries). Digest {corpus_digest(documents)}."
    )
    return "\n".join(lines)


def chunk_counts(documents: Sequence[Document], version_dir: Path, chunk_tokens: int, overlap_tokens: int) -> list[int]:
    """How many chunks the server's own chunker cuts each document into, with ``version_dir``'s tokenizer."""
    from tritonrag.server.ingest.chunking import Chunker

    chunker = Chunker.from_version_dir(version_dir, chunk_tokens, overlap_tokens)
    return [len(chunker.chunk(document.text)) for document in documents]


def main() -> None:
    """Print the passages as JSON lines (``{"text", "kind", "source"}``), or the pydoc corpus or its statistics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="number of passages")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--pydoc", action="store_true", help="the long-document corpus instead (JSON lines)")
    parser.add_argument("--stats", action="store_true", help="with --pydoc: its size distribution, not the text")
    parser.add_argument("--rebuild", action="store_true", help="with --pydoc: render again, replacing the cache")
    parser.add_argument("--tokenizer", type=Path, help="with --stats: a model version directory (default: cached)")
    parser.add_argument("--pydoc-worker", nargs="+", help=argparse.SUPPRESS)  # the child process: OUT [MODULE ...]
    args = parser.parse_args()
    if args.pydoc_worker:
        _pydoc_worker(Path(args.pydoc_worker[0]), args.pydoc_worker[1:] or None)
    elif args.pydoc and args.stats:
        from stack import model_repository, version_dir

        documents = pydoc_documents(args.rebuild)
        tokenizer_dir = args.tokenizer or version_dir(model_repository(None, ["embedder"]), "embedder")
        counts = chunk_counts(documents, tokenizer_dir, 200, 40)
        print(f"pydoc corpus ({pydoc_cache_file().name}), chunks of 200 tokens with 40 of overlap ({tokenizer_dir}):")
        print(pydoc_stats(documents, counts))
    elif args.pydoc:
        for document in pydoc_documents(args.rebuild):
            print(json.dumps(asdict(document), ensure_ascii=False))
    else:
        for passage in build_corpus(args.size, args.seed):
            print(json.dumps(asdict(passage), ensure_ascii=False))


if __name__ == "__main__":
    main()
