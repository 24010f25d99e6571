"""The layers of docs/architecture.md, checked on the source itself (Python's own `ast`):
no import circle, no import from a layer to one above it, and one of each thing that
was once written twice: one placer, one safetensors header reader, one channel class."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlxdist", "quantize")

# lowest first; a module may import its own layer and the layers before it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mlxdist", "mlxdist.errors", "mlxdist.files", "mlxdist.framing", "mlxdist.shard_format")),
    ("placement", ("mlxdist.placement",)),
    ("quantize", ("quantize", "mlxdist.demo_model")),
    ("runtime", ("mlxdist.runtime",)),
    ("cluster", ("mlxdist.cluster",)),
    ("server", ("mlxdist.server",)),
    ("chat", ("mlxdist.chat",)),
    ("commands", ("mlxdist.demo", "mlxdist.cli", "mlxdist.__main__")),
]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (so `mlxdist` alone is the base)."""
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
    return best


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `module` imports, at any depth of the file (functions,
    `if TYPE_CHECKING:` blocks), resolved to the longest known module name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_the_graph_is_read(graph):
    """The reader finds edges we know are there (else the tests below prove nothing)."""
    assert "mlxdist.runtime.api" in graph["mlxdist.runtime.engine"]
    assert "mlxdist.errors" in graph["quantize.convert"]
    assert len(graph) > 60


def test_no_import_goes_up_a_layer(graph):
    up = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def test_no_import_circles(graph):
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def _defs(pattern: str) -> list[str]:
    """'module:name' of every function or class whose name matches `pattern`."""
    out = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and re.fullmatch(pattern, node.name):
                out.append(f"{module}:{node.name}")
    return sorted(out)


def _sources_matching(pattern: str) -> list[str]:
    return sorted(m for m, p in modules().items() if re.search(pattern, p.read_text()))


def test_one_placer():
    """Only the placement package decides where layers and experts go."""
    placers = [d for d in _defs(r"_?place(_\w+)?|_?assign_\w+")
               if not d.startswith(("mlxdist.placement:", "mlxdist.placement."))]
    assert not placers, f"placement decided outside mlxdist.placement: {placers}"


def test_one_safetensors_header_reader():
    """A safetensors file starts with a little-endian u64 header length: one module reads it."""
    readers = _sources_matching(r"""unpack(_from)?\(\s*["']<Q["']|from_bytes\([^)]*["']little["']""")
    assert readers == ["mlxdist.shard_format"], readers


def test_one_channel_class():
    channels = _defs(r"\w*Channel")
    assert channels == ["mlxdist.framing:Channel"], channels
    framers = _sources_matching(r"""struct\.(pack|unpack|Struct)\(\s*["']>I["']""")
    assert framers == ["mlxdist.framing"], framers
