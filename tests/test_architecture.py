"""The import contract: packages by concern whose imports point one way, no cycle, one mpi4py import.

Layers, top to bottom; a module may import its own package and the layers below its own, never a
layer above it nor a sibling of its own layer (docs/architecture.md explains each package)::

    cli -> app -> {config, launch} -> training -> {parallel, storage} -> {nn, optim, data} -> runtime
        -> {errors, _version}

The package ``dptrain/__init__.py`` (the public API) and ``__main__.py`` stand above all of them. Every
import counts, also one inside a function; only those under ``if TYPE_CHECKING:`` (annotations) do not.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dptrain"

LAYERS = [
    ["dptrain.cli"],
    ["dptrain.app"],
    ["dptrain.config", "dptrain.launch"],
    ["dptrain.training"],
    ["dptrain.parallel", "dptrain.storage"],
    ["dptrain.nn", "dptrain.optim", "dptrain.data"],
    ["dptrain.runtime"],
    ["dptrain.errors", "dptrain._version"],
]
FACADE = {"dptrain", "dptrain.__main__"}
#: third-party packages a part of dptrain may import (the standard library is always allowed)
THIRD_PARTY = {
    "dptrain.nn": {"numpy", "scipy"},
    "dptrain.optim": {"numpy", "scipy", "threadpoolctl"},
    "dptrain.parallel.comm": {"numpy", "mpi4py"},
    "dptrain.cli": {"click"},
    # the datasets' own packages (optional extras: mnist1d; PIL, Pillow, for data.name = "images")
    "dptrain.data": {"numpy", "sklearn", "mnist1d", "PIL"},
    "dptrain.app.export": {"numpy", "onnx", "safetensors"},  # the export formats' packages (the export extra)
    "dptrain.training.callbacks.tensorboard": {"numpy", "tensorboardX"},  # the tensorboard extra
    "dptrain.training.callbacks.mlflow_logger": {"numpy", "mlflow"},  # the mlflow extra
}
ALWAYS = {"numpy", "scipy", "threadpoolctl", "tqdm", "sklearn", "matplotlib", "tomli"}  # tqdm: the progress bar


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the module ``name``: dptrain modules resolved to the
    module file they load (``from dptrain import data`` -> dptrain.data), others by top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return found


def owner(module: str) -> str | None:
    """The package of LAYERS that ``module`` belongs to."""
    for layer in LAYERS:
        for package in layer:
            if module == package or module.startswith(package + "."):
                return package
    return None


def layer_index(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import that breaks the contract, as "file:line: what"."""
    modules = module_files(root)
    problems = []
    for name, path in modules.items():
        where = f"{path.relative_to(root.parent)}"
        mine = owner(name)
        if name not in FACADE and mine is None:
            problems.append(f"{where}: module {name} is in no layer of the contract")
            continue
        for target, line in imports_of(name, path, modules):
            top = target.split(".")[0]
            if top == "mpi4py" and name != "dptrain.parallel.comm":
                problems.append(f"{where}:{line}: imports mpi4py (only dptrain/parallel/comm.py may)")
            if top != "dptrain":
                allowed = next((v for k, v in THIRD_PARTY.items() if name == k or name.startswith(k + ".")), None)
                is_stdlib = top in sys.stdlib_module_names or top == "__future__"
                if allowed is not None and not is_stdlib and top not in allowed:
                    problems.append(f"{where}:{line}: imports {top} ({owner(name) or name} may import "
                                    f"{', '.join(sorted(allowed))} and the standard library)")
                elif allowed is None and not is_stdlib and top not in ALWAYS | {"mpi4py"}:
                    problems.append(f"{where}:{line}: imports {top}, which no rule allows here")
                continue
            if name in FACADE:
                continue
            theirs = owner(target)
            if target == "dptrain" or theirs is None:
                problems.append(f"{where}:{line}: imports {target} (the package's facade): import the module itself")
            elif theirs != mine and layer_index(theirs) <= layer_index(mine):
                kind = "a sibling" if layer_index(theirs) == layer_index(mine) else "a layer above"
                problems.append(f"{where}:{line}: {mine} imports {target}, {kind} ({theirs})")
    return problems + cycles(root)


def cycles(root: Path = PACKAGE) -> list[str]:
    """Import cycles between modules (a subpackage's __init__ counts as imported with its modules)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target, _ in imports_of(name, path, modules):
            if target in modules and target != "dptrain":
                targets.add(target)
                parent = target.rpartition(".")[0]
                while parent and parent != "dptrain":  # importing a.b.c runs a.b's __init__ first,
                    if not (name == parent or name.startswith(parent + ".")):  # unless a.b is running
                        targets.add(parent)
                    parent = parent.rpartition(".")[0]
        graph[name] = targets - {name}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node not in FACADE:
            visit(node)
    return [f"import cycle: {c}" for c in found]


def test_imports_point_one_way_with_no_cycle():
    problems = violations()
    assert not problems, "the import contract is broken:\n" + "\n".join(problems)


def test_every_package_is_in_the_contract():
    packages = {p.parent.relative_to(PACKAGE.parent).as_posix().replace("/", ".")
                for p in PACKAGE.glob("*/__init__.py")}
    named = {package for layer in LAYERS for package in layer}
    assert packages <= named, f"packages missing from LAYERS: {sorted(packages - named)}"


@pytest.mark.parametrize("module, line, expected", [
    ("nn/extra.py", "from dptrain.parallel.comm import make_comm\n", "dptrain.nn imports dptrain.parallel.comm, a layer above"),
    ("data/extra.py", "from dptrain.optim import SGD\n", "dptrain.data imports dptrain.optim, a sibling"),
    ("storage/extra.py", "def f():\n    from dptrain.training import Trainer\n", "a layer above"),
    ("optim/extra.py", "import mpi4py\n", "imports mpi4py (only dptrain/parallel/comm.py may)"),
    ("nn/extra.py", "import click\n", "imports click"),
    ("data/extra.py", "from dptrain import __version__\n", "the package's facade"),
    ("runtime/a.py", "from . import b\n", "import cycle"),
])
def test_the_contract_catches_a_bad_import(tmp_path, module, line, expected):
    """The checker itself: an upward import, a sibling's, mpi4py or click in the wrong place, the facade,
    a cycle, each added to a skeleton of the package (its layers' packages, empty), is reported."""
    skeleton = tmp_path / "dptrain"
    for package in (p for layer in LAYERS for p in layer):
        path = tmp_path / (package.replace(".", "/") + ("/__init__.py" if package.count(".") == 1 and
                                                        not package.endswith(("errors", "_version")) else ".py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (skeleton / "__init__.py").touch()
    assert not violations(skeleton)
    (skeleton / module).write_text(line)
    if module == "runtime/a.py":
        (skeleton / "runtime" / "b.py").write_text("from . import a\n")
    assert any(expected in p for p in violations(skeleton)), violations(skeleton)
