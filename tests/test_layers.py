"""The architecture's rules, read from the package's own imports (docs/architecture.md explains them).

Each layer imports only layers below it; frontends, passes and targets never import each other;
a target never imports another target; ir imports nothing of adaptrix but the artifact names; the
runtimes import only the artifact helpers and their own runtime library; no import cycle; no
module over 300 lines; every name `adaptrix archs | targets | passes` lists lives in a file named
after it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import adaptrix

PACKAGE = Path(adaptrix.__file__).parent
# Lower rank: lower layer. A module may import layers of lower rank, and its own layer where the
# layer allows it (SIBLINGS); frontends, passes and targets share a rank and never import each other.
RANK = {
    "artifacts": 0, "ir": 1, "binders": 2, "io": 3, "lowering": 4, "calibration": 5,
    "frontends": 6, "passes": 6, "targets": 6, "api": 7, "cli": 8,
}  # fmt: skip
# What the serving-time runtimes may import of adaptrix: artifact names, errors, strict JSON, finiteness.
RUNTIME_HELPERS = {"adaptrix.artifacts", "adaptrix.ir.errors", "adaptrix.io.jsonfile", "adaptrix.ir.finite"}
SHIMS = {
    "adaptrix",
    "adaptrix.__main__",
    "adaptrix.runtime",
}  # the public surface, kept for users
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every adaptrix module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaptrix"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("adaptrix"))
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _target_of(module: str) -> str | None:
    """The target a module of adaptrix/targets belongs to (None: the registry and its result type)."""
    parts = module.split(".")
    if len(parts) < 3 or parts[2] in ("written",):
        return None
    return parts[2]


def test_every_module_is_in_a_known_layer():
    unknown = sorted(
        m for m in MODULES if m not in SHIMS and _layer(m) not in RANK and _layer(m) != "runtimes"
    )
    assert not unknown, f"modules outside the layers of docs/architecture.md: {unknown}"


def test_imports_point_down_the_layers():
    wrong = []
    for module, imported in IMPORTS.items():
        layer = _layer(module)
        if module in SHIMS or layer not in RANK:
            continue
        for other in imported:
            other_layer = _layer(other)
            if other_layer == layer:
                continue
            if other_layer == "runtimes" and layer in ("api", "cli"):
                continue  # inspect reads bundles and adapter files with the runtimes' own readers
            if other in SHIMS or RANK.get(other_layer, 99) >= RANK[layer]:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_ir_imports_nothing_of_adaptrix_but_the_artifact_names():
    wrong = [f"{m} -> {o}" for m in IMPORTS if _layer(m) == "ir" for o in IMPORTS[m]
             if _layer(o) != "ir" and o != "adaptrix.artifacts"]  # fmt: skip
    assert not wrong, wrong


def test_a_target_never_imports_another_target():
    wrong = []
    for module, imported in IMPORTS.items():
        if _layer(module) != "targets" or (mine := _target_of(module)) is None:
            continue
        wrong += [
            f"{module} -> {o}"
            for o in imported
            if _layer(o) == "targets" and _target_of(o) not in (None, mine)
        ]
    assert not wrong, wrong


def test_runtimes_import_only_their_own_modules_and_the_artifact_helpers():
    wrong = []
    for module, imported in IMPORTS.items():
        if _layer(module) != "runtimes":
            continue
        runtime = module.split(".")[2] if module.count(".") >= 2 else None
        for other in imported:
            own = (
                other.startswith(f"adaptrix.runtimes.{runtime}")
                if runtime
                else other.startswith("adaptrix.runtimes")
            )
            if not own and other not in RUNTIME_HELPERS:
                wrong.append(f"{module} -> {other}")
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("runtime", "forbidden"),
    [("adaptrix.runtimes.hooks", ["transformers", "peft", "onnx", "onnxruntime", "typer"]),
     ("adaptrix.runtime", ["transformers", "peft", "onnx", "onnxruntime", "typer"]),
     ("adaptrix.runtimes.onnx.session", ["torch", "transformers", "peft", "typer"])],
)  # fmt: skip
def test_a_runtime_loads_without_the_compilers_libraries(runtime, forbidden):
    code = f"import sys, {runtime}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "", f"{runtime} loads {loaded.strip()}"


def test_no_import_cycle():
    graph = defaultdict(set)
    for module, imported in IMPORTS.items():
        graph[module] = {o for o in imported if o in MODULES and o != module}
    state, stack, cycles = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    cycles = [c for c in cycles if not _package_and_its_modules(c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _package_and_its_modules(cycle: list[str]) -> bool:
    """A package's __init__ that imports its own modules, which import each other by full name."""
    return all(part == cycle[0] or part.startswith(cycle[0] + ".") for part in cycle)


def test_no_module_is_over_300_lines():
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_registered_names_live_in_files_named_after_them():
    from adaptrix.binders import BINDERS
    from adaptrix.passes import PASSES
    from adaptrix.targets import TARGETS

    wrong = []
    names = {binder.name for binder in BINDERS.values()}
    wrong += [
        f"binder {name}" for name in sorted(names) if not (PACKAGE / "binders" / f"{name}.py").is_file()
    ]
    for name, target in TARGETS.items():
        home = f"adaptrix.targets.{name.split('-')[0]}"
        if target.write.__module__ != home:
            wrong.append(f"target {name}: {target.write.__module__}")
    for name, spec in PASSES.items():
        home = f"adaptrix.passes.{name.replace('-', '_')}"
        if spec.run.__module__ != home:
            wrong.append(f"pass {name}: {spec.run.__module__}")
    assert not wrong, wrong


def test_the_runtime_shim_is_the_hooks_runtime():
    import adaptrix.runtime as shim
    import adaptrix.runtimes.hooks as hooks

    assert shim.attach is hooks.attach and shim.switch is hooks.switch and adaptrix.attach is hooks.attach


def test_the_activations_the_ir_accepts_are_those_the_runtime_computes():
    from adaptrix.artifacts import ACTIVATION_NAMES
    from adaptrix.runtimes.hooks.activations import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


def test_the_public_api_loads_from_the_package():
    for name in adaptrix.__all__:
        assert getattr(adaptrix, name) is not None, name
