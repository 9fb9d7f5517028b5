"""The house: imports flow down (no cycle, module-level or inside functions), every module imports in any order,
no caller asks which network class it holds (symstitch.network), and the commands answer --help without
importing torch or Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import symstitch

from .conftest import REPO, cli_env

PACKAGE = REPO / "symstitch"
#: the one module that may name network classes in a type check
NETWORK_MODULE = "symstitch.network"
#: the roots of the network classes: every class of the package derived from one is a network class too
NETWORK_ROOTS = {"PointNetwork", "StagedNet", "GraphNet"}


def module_files() -> dict[str, Path]:
    """module name → its file, for every module of the package."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    return files


def import_graph() -> dict[str, set[str]]:
    """module → the symstitch modules it imports anywhere in its file (top level or inside functions)."""
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, f in files.items():
        package = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in files and n not in (module, "symstitch")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a list of modules (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_symstitch_imports_have_no_cycle():
    graph = import_graph()
    assert {"symstitch.io", "symstitch.library", "symstitch.runner", "symstitch.commands",
            "symstitch.metrics.pairwise", "symstitch.graph"} <= set(graph)
    assert find_cycle(graph) == []
    # the floors: the core never imports the experiment or command layers
    core = ("symstitch.network", "symstitch.models", "symstitch.graph", "symstitch.data", "symstitch.inputs", "symstitch.symmetry",
            "symstitch.stitch_layers", "symstitch.metrics", "symstitch.io", "symstitch.registry",
            "symstitch.checkpoints", "symstitch.library")
    upper = {"symstitch.runner", "symstitch.sweep", "symstitch.commands", "symstitch.cli", "symstitch.stitching",
             "symstitch.align", "symstitch.projection", "symstitch.zoo", "symstitch.report"}
    for module, imported in graph.items():
        if module.startswith(core):
            assert not imported & upper, (module, imported & upper)


# slow: the imports-first test below imports every module first, in a clean state, and so covers any order
@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_any_order(tmp_path, order):
    modules = sorted(m for m in import_graph() if m != "symstitch.__main__")  # that one runs the command
    if order == "reversed":
        modules.reverse()
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % modules
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_module_imports_first(tmp_path):
    """Each module imported before any other symstitch module (the package's modules forgotten in between; torch
    and Lightning stay loaded): whatever order a program imports them in, each finds what it needs."""
    modules = sorted(m for m in import_graph() if m != "symstitch.__main__")
    code = """
import importlib, sys
for m in %r:
    for loaded in [n for n in sys.modules if n == "symstitch" or n.startswith("symstitch.")]:
        del sys.modules[loaded]
    try:
        module = importlib.import_module(m)
    except Exception as err:
        sys.exit(f"{m} does not import first: {type(err).__name__}: {err}")
    if m == "symstitch.sweep":  # the sweeps know every experiment kind (each has a report section)
        known = sorted(sys.modules["symstitch.runner"].EXPERIMENTS.available())
        if known != sorted(importlib.import_module("symstitch.reports").SECTIONS):
            sys.exit(f"symstitch.sweep, imported first, knows only the experiments {known}")
""" % modules
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def network_classes() -> set[str]:
    """The names of the network classes: the roots and every class of the package derived from one."""
    bases: dict[str, set[str]] = {}
    for f in module_files().values():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(_name(b) for b in node.bases)
    found = set(NETWORK_ROOTS)
    while True:
        more = {c for c, b in bases.items() if b & found} - found
        if not more:
            return found
        found |= more


def _name(node: ast.AST) -> str:
    """The last name of ``a.b.C`` or ``C`` (else '')."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def type_checks(tree: ast.AST, classes: set[str]) -> list[tuple[int, str]]:
    """``(line, code)`` of every type check naming one of ``classes``: ``isinstance``/``issubclass`` with such a
    class (alone or in a tuple), ``type(x)`` compared with one (``is``, ``==``, ``in``), and a class name as a
    string, compared or passed to a call (registration by class name: ``register("MCNN")``)."""
    found = []

    def named(node: ast.AST) -> bool:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(_name(n) in classes for n in items)

    def is_class_string(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in classes

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = _name(node.func)
            if fn in ("isinstance", "issubclass") and len(node.args) == 2 and named(node.args[1]):
                found.append((node.lineno, ast.unparse(node)))
            elif any(is_class_string(a) for a in node.args):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            asks_type = any(isinstance(n, ast.Call) and _name(n.func) == "type" for n in sides)
            if (asks_type and any(named(n) for n in sides)) or any(is_class_string(n) for n in sides):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_type_checks_finds_them():
    classes = {"GraphNet", "StagedNet"}
    code = """
isinstance(model, GraphNet)
isinstance(model, (nn.Module, graph.GraphNet))
type(model) is StagedNet
type(model).__name__ == "GraphNet"
FAMILIES.register("StagedNet")
isinstance(model, nn.Linear)
type(module) is cls
"""
    assert [line for line, _ in type_checks(ast.parse(code), classes)] == [2, 3, 4, 5, 6]


def test_no_type_check_of_a_network_class_outside_the_network_module():
    """Callers ask a network (symstitch.network.PointNetwork), never which class it is; each family declares its
    own symmetry sites, so nothing registers them by class name."""
    classes = network_classes()
    assert {"StagedNet", "MCNN", "CifarResNet", "CCT", "GraphNet", "TracedNet", "HookedNet"} <= classes
    offences = [f"{module}:{line}: {code}" for module, f in sorted(module_files().items()) if module != NETWORK_MODULE
                for line, code in type_checks(ast.parse(f.read_text()), classes)]
    assert offences == []
    # the weight-space action knows no family: none of them is imported by it
    assert not {m for m in import_graph()["symstitch.symmetry"] if m.startswith("symstitch.models")}


def test_help_without_torch_or_lightning(tmp_path):
    """`symstitch --help`, `--version` and every non-LightningCLI subcommand's --help parse before any heavy import."""
    code = """
import sys
from symstitch import commands
for argv in (["--help"], ["--version"], *[[name, "--help"] for name in commands.COMMANDS]):
    try:
        code = commands.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None), (argv, code)
heavy = sorted(m for m in ("torch", "lightning", "wandb", "matplotlib", "scipy") if m in sys.modules)
print("HEAVY", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout
    for name in ("stitch", "align", "sweep", "zoo", "projection", "check", "report", "points"):
        assert f"usage: symstitch {name}" in proc.stdout


def test_bad_arguments_answer_in_one_line(tmp_path):
    env = cli_env(tmp_path)
    for argv, says in ((["stitch", "--source", "a", "--target", "b", "--epochs", "-3"], "expected a positive integer"),
                       (["sweep", "--config", "x.yaml", "--cell", "x"], "bad cell list 'x'"),
                       (["nonsense"], "unknown command 'nonsense'")):
        proc = subprocess.run([sys.executable, "-m", "symstitch", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
    version = subprocess.run([sys.executable, "-m", "symstitch", "--version"], capture_output=True, text=True, env=env)
    assert version.stdout.startswith("symstitch ") and version.returncode == 0


def test_shared_names_are_declared_once_in_a_module_that_imports_nothing():
    """The names both the command layer and the experiments need live in symstitch.defaults, which imports no
    other module (so that the torch-free commands can read them), and nowhere else."""
    package = Path(symstitch.__file__).parent
    tree = ast.parse((package / "defaults.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [n.module for n in imports if isinstance(n, ast.ImportFrom)] == ["__future__"] and len(imports) == 1
    shared = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])}
    assert {"LIGHTNING_COMMANDS", "PAPER_METRICS", "STITCH_DEFAULTS"} <= shared
    for path in package.rglob("*.py"):
        if path.name == "defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                again = {t.id for t in targets if isinstance(t, ast.Name)} & shared
                assert not again, f"{path.relative_to(package)} declares {again} again"
