"""The shape of daemon/ (issue 13): an acyclic import graph, no calls into another module's underscore names, no
function over 60 lines except the declarative tables listed here. Static checks with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
MAX_LINES = 60
# Declarative tables, exempt from MAX_LINES: one statement per Prometheus metric; the ONNX graph's node list.
TABLES = {("metrics.py", "Metrics.__init__"), ("onnx_export.py", "to_onnx")}


def _modules() -> dict[str, ast.Module]:
    """daemon/ and daemon/cluster/ modules by name (the names are distinct; of the two __init__ files, which are
    docstrings, one is kept)."""
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(DAEMON.rglob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """daemon modules a module imports, anywhere in it (function-level and TYPE_CHECKING imports count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstmd.daemon"):
            rest = node.module.removeprefix("lstmd.daemon").lstrip(".")
            found |= {rest.split(".")[0]} if rest else {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("lstmd.daemon.")}
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_daemon_import_graph_is_acyclic():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    assert graph["server"] >= {"pipeline", "recovery", "control"}  # the walk sees the imports at all
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_module_uses_another_modules_underscore_names():
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offenders.append(f"{name}.py:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lstmd."):
                offenders += [f"{name}.py:{node.lineno} imports {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def _functions(tree: ast.Module):
    """(qualified name, node) of every function, methods as Class.method."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_no_function_in_daemon_is_over_60_lines():
    long, tables_seen = [], set()
    for name, tree in _modules().items():
        for qualname, node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            if (f"{name}.py", qualname) in TABLES:
                tables_seen.add((f"{name}.py", qualname))
            elif lines > MAX_LINES:
                long.append(f"{name}.py {qualname}: {lines} lines")
    assert long == []
    assert tables_seen == TABLES  # an exemption that names nothing is stale: remove it


def test_server_keeps_only_the_lifecycle_and_the_loop():
    """Sockets (endpoints.py), training (online.py), the initial model (model_loader.py), delayed targets and
    forecasts (side_requests.py) and the status report (report.py) live with their owners, not in server.py."""
    lines = len((DAEMON / "server.py").read_text().splitlines())
    assert lines < 450, f"daemon/server.py has {lines} lines"
