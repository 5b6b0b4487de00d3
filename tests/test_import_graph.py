"""lowrax's floors: every import (function-level ones included) runs down the floor list, and none in a cycle.

FLOORS is the one written statement of the layering docs/ARCHITECTURE.md draws: a module
imports only modules on its own floor or below. A module's floor is that of the longest
prefix listed for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowrax

ROOT = Path(lowrax.__file__).resolve().parent


FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("lowrax.errors", "lowrax.core")),
    ("weights", ("lowrax.io", "lowrax.quant", "lowrax.sparse", "lowrax.dist.sharding")),
    ("models", ("lowrax.models",)),
    ("adapters", ("lowrax.adapters", "lowrax.peft")),
    ("objectives, merging, pruning", ("lowrax.objectives", "lowrax.merging", "lowrax.pruning")),
    ("training library", ("lowrax.train", "lowrax.dist")),
    ("application", ("lowrax", "lowrax.cli", "lowrax.optim", "lowrax.train_step", "lowrax.sharding",
                     "lowrax.train.trainer", "lowrax.train.runs", "lowrax.train.build", "lowrax.train.scoring",
                     "lowrax.train.preference_run", "lowrax.train.grpo_run", "lowrax.train.on_policy", "lowrax.train.teacher",
                     "lowrax.train.adapter_sets", "lowrax.train.objective_runs", "lowrax.train.metrics_log",
                     "lowrax.pruning.config", "lowrax.pruning.run",
                     "lowrax.merging.checkpoints")),
)


def floor_of(module: str) -> int:
    """The index in FLOORS of the longest prefix naming `module`."""
    best, level = -1, None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is on no floor: add it to FLOORS"
    return level


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


def upward_imports(modules: dict[str, Path]) -> list[tuple[str, str]]:
    """Every (importer, imported) pair where the import runs from a lower floor to a higher one."""
    return [(name, target) for name, path in sorted(modules.items())
            for target in sorted(imports_of(name, path, modules)) if floor_of(target) > floor_of(name)]


def test_every_import_runs_down_the_floors():
    modules = module_names()

    def where(name):
        return f"{modules[name].relative_to(ROOT.parent)} ({FLOORS[floor_of(name)][0]})"

    upward = [f"{where(low)} imports {where(high)}" for low, high in upward_imports(modules)]
    assert not upward, "imports up the floors:\n  " + "\n  ".join(upward)


def test_every_module_is_on_a_floor():
    for name in module_names():
        floor_of(name)


def test_the_floor_check_sees_a_function_level_upward_import(tmp_path):
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from lowrax.train.trainer import run_training\n")
    high = tmp_path / "trainer.py"
    high.write_text("from lowrax.core import linear\n")
    modules = {"lowrax.core.low": low, "lowrax.train.trainer": high, "lowrax.core.linear": tmp_path / "none.py"}
    (tmp_path / "none.py").write_text("")
    assert upward_imports(modules) == [("lowrax.core.low", "lowrax.train.trainer")]


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
