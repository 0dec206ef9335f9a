"""The package layering, read from the source: imports run one way, and no two modules import each other.

    rl.cli -> rl.recipes -> rl.loop -> {rollout, trainer, rewards} -> {rl.model, rl.algo} -> kernels

Every import counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl", "rollout", "trainer", "rewards", "kernels")

# Layer of a module by its longest matching prefix; a module may import its own layer or any lower one.
LAYERS = {
    "kernels": 0,
    "rl": 0,  # rl/__init__.py: a docstring, nothing imported
    "rl.model": 1,
    "rl.algo": 1,
    "rewards": 1,  # scoring and the code sandbox: agent environments verify with them
    "rollout": 2,
    "trainer": 2,
    "rl.loop": 3,
    "rl.recipes": 4,
    "rl.cli": 5,
}
# Same-layer packages that must stay independent of each other.
SEPARATE = [("rollout", "trainer"), ("rl.model", "rl.algo"), ("rl.model", "rewards"), ("rl.algo", "rewards")]
# The one exception: trainer rank 0 publishes weights for the engines, in the format the rollout side receives
# (rollout.weight_sync is that contract: the handle, the file and object-store transports).
ALLOWED = {("trainer", "rollout.weight_sync")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """keel modules that `name` imports (resolved to the longest known module name)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.split(".")[0] in PACKAGES:
                found.add(t)
    return found


def layer_of(name: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in tests/test_layering.py")
    return prefix, LAYERS[prefix]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_imports_run_down_the_layers(graph):
    wrong = []
    for name, deps in graph.items():
        top, level = layer_of(name)
        for dep in deps:
            dep_top, dep_level = layer_of(dep)
            if (top, dep) in ALLOWED:
                continue
            if dep_level > level or {top, dep_top} in [set(pair) for pair in SEPARATE]:
                wrong.append(f"{name} ({top}) imports {dep} ({dep_top})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    # Package __init__ modules re-export their children; a child importing its package's sibling through
    # the package is fine, so cycles are looked for among plain modules.
    plain = {n: {d for d in deps if not (ROOT / d.replace(".", "/") / "__init__.py").exists()}
             for n, deps in graph.items() if not (ROOT / n.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(plain.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(plain):
        if n not in state and (cycle := visit(n)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_violation():
    """The checker itself: a trainer module importing the loop is reported."""
    fake = {"trainer.x": {"rl.loop.driver"}, "rl.loop.driver": set()}
    top, level = layer_of("trainer.x")
    assert any(layer_of(d)[1] > level for d in fake["trainer.x"])
