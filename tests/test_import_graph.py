"""lowrax's modules import each other without a cycle, function-level imports included.

A cycle that a lazy import hides still ties two modules into one; the layering
in docs/ARCHITECTURE.md (models and quant below adapters, adapters below peft,
train and dist, the CLI on top) is what this test keeps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowrax

ROOT = Path(lowrax.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lowrax modules `name` names in any import statement, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_shared_code_names_no_adapter_method():
    """The PEFT reader/writer, the train step, the optimizer and the model files reach
    methods through the registry only."""
    modules = module_names()
    core = {f"lowrax.adapters.{m}" for m in ("node", "registry", "targets", "tree", "wrap", "catalog", "slots")}
    methods = {m for m in modules if m.startswith("lowrax.adapters.") and m not in core}
    assert methods  # the method modules: everything under adapters/ but the core
    shared = [m for m in modules if m.startswith(("lowrax.peft", "lowrax.models", "lowrax.train.step", "lowrax.train.optim",
                                                  "lowrax.dist", "lowrax.adapters.tree", "lowrax.adapters.wrap"))]
    for name in shared:
        named = imports_of(name, modules[name], modules) & methods
        assert not named, f"{name} imports method modules {sorted(named)}"


def test_names_the_01_readme_documented_still_import():
    import lowrax.sharding
    from lowrax.optim import OptimizerConfig, make_optimizer  # noqa: F401
    from lowrax.train_step import init_state, make_train_step  # noqa: F401

    assert lowrax.lora.wrap is lowrax.wrap and lowrax.sharding.RULES is lowrax.dist.sharding.RULES
    assert make_train_step is lowrax.make_train_step and OptimizerConfig is lowrax.OptimizerConfig
