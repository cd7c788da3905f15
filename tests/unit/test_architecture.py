"""The allowed directions of imports between tritonrag's packages, checked on the installed package's graph.

grimp reads every import statement, those inside functions and under ``if TYPE_CHECKING`` included.
"""

from __future__ import annotations

import copy

import grimp
import pytest

# Each package, and the only parts of tritonrag that its modules may import (itself included).
ALLOWED: dict[str, tuple[str, ...]] = {
    "tritonrag.export": ("tritonrag.export",),
    # The code that runs inside Triton: copied into the model repository without the rest of tritonrag.
    "tritonrag.export.runtime": ("tritonrag.export.runtime",),
    "tritonrag.export.runtime.contract": (),
    "tritonrag.clients": ("tritonrag.clients",),
    # The API's types and generated gRPC code, shared by the server and the SDK.
    "tritonrag.clients.wire": ("tritonrag.clients.wire",),
    # The roll-out controller checks version directories with the exporter's own rules (a module without torch).
    "tritonrag.server": (
        "tritonrag.server",
        "tritonrag.clients.wire",
        "tritonrag.export.runtime",
        "tritonrag.export.repository",
        "tritonrag.export.errors",
    ),
}
# Higher to lower: a package imports only from those below it (export and clients: neither from the other).
LAYERS = ("deploy", "server", grimp.Layer("export", "clients", independent=True))


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def violations(graph: grimp.ImportGraph) -> list[str]:
    """Every import against ALLOWED and every chain of imports against LAYERS, one line each."""
    found = []
    for package, allowed in ALLOWED.items():
        for importer in sorted({package, *graph.find_descendants(package)}):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if not _within(imported, allowed):
                    lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
                    found.append(f"{importer} -> {imported} {lines}: {package} may import only {allowed} of tritonrag")
    layered = graph.find_illegal_dependencies_for_layers(layers=LAYERS, containers={"tritonrag"})
    for dependency in sorted(layered, key=lambda d: (d.importer, d.imported)):
        chains = sorted(" -> ".join(c) for c in graph.find_shortest_chains(dependency.importer, dependency.imported))
        found.append(f"{dependency.importer} imports {dependency.imported}, against the layers: {'; '.join(chains)}")
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("tritonrag", cache_dir=None)


def test_imports_go_only_in_the_allowed_directions(graph: grimp.ImportGraph) -> None:
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("tritonrag.export.exporter", "tritonrag.server.config"),
        ("tritonrag.export.exporter", "tritonrag.clients.wire.schema"),
        ("tritonrag.export.runtime.encoding", "tritonrag.export.exporter"),
        ("tritonrag.export.runtime.contract", "tritonrag.export.runtime.encoding"),
        ("tritonrag.clients.wire.schema", "tritonrag.clients.progress"),
        ("tritonrag.clients.progress", "tritonrag.export.runtime.contract"),
        ("tritonrag.server.config", "tritonrag.clients.progress"),
        ("tritonrag.server.config", "tritonrag.export.exporter"),
        ("tritonrag.server.config", "tritonrag.deploy.cli"),
        ("tritonrag.clients.progress", "tritonrag.deploy.cli"),
    ],
)
def test_a_forbidden_import_is_found(graph: grimp.ImportGraph, importer: str, imported: str) -> None:
    bad = copy.deepcopy(graph)
    bad.add_import(importer=importer, imported=imported)
    assert any(f"{importer} -> {imported}" in line for line in violations(bad))
