"""The house: imports flow down (no cycle, module-level or inside functions), any module imports on its own,
and the commands answer --help without importing torch or Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import symstitch

from .conftest import REPO, cli_env

PACKAGE = REPO / "symstitch"


def import_graph() -> dict[str, set[str]]:
    """module → the symstitch modules it imports anywhere in its file (top level or inside functions)."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
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
    core = ("symstitch.models", "symstitch.graph", "symstitch.data", "symstitch.inputs", "symstitch.symmetry",
            "symstitch.stitch_layers", "symstitch.metrics", "symstitch.io", "symstitch.registry",
            "symstitch.checkpoints", "symstitch.library")
    upper = {"symstitch.runner", "symstitch.sweep", "symstitch.commands", "symstitch.cli", "symstitch.stitching",
             "symstitch.align", "symstitch.projection", "symstitch.zoo", "symstitch.report"}
    for module, imported in graph.items():
        if module.startswith(core):
            assert not imported & upper, (module, imported & upper)


@pytest.mark.parametrize("order", ["sorted", pytest.param("reversed", marks=pytest.mark.slow)])
def test_every_module_imports_in_any_order(tmp_path, order):
    modules = sorted(m for m in import_graph() if m != "symstitch.__main__")  # that one runs the command
    if order == "reversed":
        modules.reverse()
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % modules
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
