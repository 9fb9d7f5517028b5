"""The README and docs/ pages: every file they name exists, every command they show is one, every link lands,
and the README's Python runs as written."""

import re
from pathlib import Path

import pytest

from symstitch.commands import COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_images_land(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        landing = (page.parent / path).resolve() if path else page
        assert landing.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", landing.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading #{anchor} in {path or page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_configs_and_experiments_named_exist(page):
    for name in set(re.findall(r"\b((?:configs|experiments)/[\w./-]+\.(?:ya?ml|py))", page.read_text())):
        assert (ROOT / name).exists(), f"{page.name} names {name}, which does not exist"
    for name in set(re.findall(r"`(\w+_(?:digits|cifar10)\w*\.yaml)`", page.read_text())):
        assert (ROOT / "experiments" / name).exists(), f"{page.name} names {name}, which is not in experiments/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_are_commands(page):
    text = page.read_text()
    shown = re.findall(r"(?:^|[\s`(])symstitch ([a-z][\w-]*)", "\n".join(_code_blocks(text, "bash")), flags=re.M)
    shown += re.findall(r"`symstitch ([a-z][\w-]*)", text)
    known = set(COMMANDS) | set(LIGHTNING_COMMANDS)
    assert not set(shown) - known, f"{page.name} shows commands that do not exist: {sorted(set(shown) - known)}"


def test_the_readme_names_every_module_in_its_layout():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    package = ROOT / "symstitch"
    modules = {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    modules |= {p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(m for m in modules if f"`{m}`" not in layout)
    assert not missing, f"the README's layout does not name {missing}"
    assert len(text.splitlines()) <= 220


@pytest.mark.slow
def test_the_readme_python_runs_as_written(monkeypatch):
    blocks = _code_blocks((ROOT / "README.md").read_text(), "python")
    assert blocks
    import torch

    namespace: dict = {}
    for block in blocks:
        # the placeholder for the user's own features
        block = block.replace("x, y = ...", "x, y = torch.randn(50, 8, 4, 4).relu(), torch.randn(50, 8, 4, 4).relu()")
        exec(compile("import torch\n" + block, "README.md", "exec"), namespace)
    assert isinstance(namespace["r"].penalty_pts, float)
    assert set(namespace["path"].barrier_loss) == {"interpolated", "reestimated"}
    assert len(namespace["rows"]) == 19 * 19 * 4  # every pair of ResNet-20's points, the four metrics
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(namespace["ga"].eval()(x), namespace["a"].eval()(x), rtol=1e-4, atol=1e-4)
