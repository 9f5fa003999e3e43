"""The package's import graph: no cycle between modules, and no import of a layer above.

Layers, bottom to top: ``errors``/``registry``/``version``/``answers``/``gym`` (base utilities) < ``models`` < ``engine`` <
``steer``, ``scale`` (side by side: neither imports the other) < ``measure`` < ``serve`` < ``commands``, ``cli``,
``demo``. Every ``import``/``from ... import`` in ``src/steerscale`` counts, also those inside functions (a lazy
import is still a dependency). A package ``__init__`` re-exporting its own children is not an edge upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import steerscale

ROOT = Path(steerscale.__file__).parent
BASE = 0
LAYERS = {"errors": BASE, "registry": BASE, "version": BASE, "answers": BASE, "gym": BASE, "models": 1, "engine": 2,
          "steer": 3, "scale": 3, "measure": 4, "serve": 5, "vllm": 5, "commands": 6, "cli": 6, "demo": 6}
TOP = 7  # the package itself (steerscale/__init__.py re-exports the public API of every layer)


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    unknown = sorted({top_package(m) for m in import_graph() if top_package(m) and top_package(m) not in LAYERS})
    assert not unknown, f"modules outside every layer (add them to LAYERS and docs/architecture.md): {unknown}"


def test_no_import_points_up_a_layer():
    upward = []
    for src, targets in import_graph().items():
        for dst in targets:
            same_level_sibling = (layer(src) == layer(dst) == LAYERS["steer"]
                                  and top_package(src) != top_package(dst))
            if layer(dst) > layer(src) or same_level_sibling:
                upward.append(f"{src} -> {dst}")
    assert not upward, "imports that point up (or sideways between steer and scale):\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_real_edges():
    """The graph walker is not vacuous: it finds real edges (engine imports models) in this tree."""
    graph = import_graph()
    assert any(dst.startswith("steerscale.models") for dst in graph["steerscale.engine.runtime"])
    assert layer("steerscale.serve.app") > layer("steerscale.scale.local") > layer("steerscale.engine.ops")


def test_the_server_decodes_with_the_core_not_the_strategy_backend():
    # issue 24: the server's own model work (generation, scoring, encoding) uses engine/decoding.py; only a strategy
    # request runs on a backend (scale/scheduled.py), never one built per request for anything else
    graph = import_graph()
    serve = {m: deps for m, deps in graph.items() if m.startswith("steerscale.serve")}
    assert serve and not [m for m, deps in serve.items() if "steerscale.scale.local" in deps]
    assert "steerscale.engine.decoding" in graph["steerscale.serve.scheduler"]


def test_one_token_acceptance_function():
    # every engine appends a sampled token through engine.decoding.RowCall.accept; none keeps its own copy
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("accept", "_accept"):
                body = ast.unparse(node)
                if "eos_ids" in body or "find_stop" in body:  # an implementation, not a caller
                    found.append(f"{name}.{node.name}")
    assert found == ["steerscale.engine.decoding.accept"], found
