"""The layout's import rules: no stage of `pipeline.STAGES` imports another stage or the runner above it, and no
modules import each other in a loop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from medtune.pipeline import STAGES

SRC = Path(__file__).resolve().parents[1] / "src" / "medtune"
ABOVE_STAGES = ("medtune.pipeline", "medtune.cli")  # what runs the stages and prints


def module_name(path: Path) -> str:
    return ".".join(("medtune", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every medtune module `path` imports, at the top or inside a function (`from medtune import x` names
    medtune.x; relative imports resolved)."""
    package = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "medtune" or name.startswith("medtune.")}


def stage_home(stage_module: str) -> str:
    """A stage's package below medtune: `medtune.data.stage` -> `medtune.data`."""
    return ".".join(stage_module.split(".")[:2])


def files_of(home: str) -> list[Path]:
    package = SRC / home.split(".")[1]
    return sorted(package.rglob("*.py")) if package.is_dir() else [package.with_suffix(".py")]


def owner(name: str, homes: list[str]) -> str | None:
    return next((home for home in homes if name == home or name.startswith(home + ".")), None)


def test_stages_import_no_other_stage_and_nothing_above_them():
    homes = sorted({stage_home(s.module) for s in STAGES})
    assert {"medtune.pairs", "medtune.data", "medtune.train", "medtune.merge", "medtune.export",
            "medtune.evaluate"} <= set(homes)
    checked = 0
    for home in homes:
        files = files_of(home)
        assert files and all(f.is_file() for f in files), home
        for path in files:
            for name in imports(path):
                other = owner(name, homes)
                assert other in (None, home), f"{path.relative_to(SRC)} (stage {home}) imports stage {name}"
                assert owner(name, list(ABOVE_STAGES)) is None, f"{path.relative_to(SRC)} imports {name}"
            checked += 1
    assert checked >= len(homes)


def test_no_import_loops():
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    edges = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(edges[name]):
            assert state.get(nxt) != "open", "import loop: " + " -> ".join([*path[path.index(nxt):], nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    assert len(state) == len(modules) > 50


def test_every_stage_is_a_package_entered_at_stage_py():
    for stage in STAGES:
        assert stage.module == f"{stage_home(stage.module)}.stage", stage
        assert (SRC / stage_home(stage.module).split(".")[1] / "stage.py").is_file(), stage
    names = [path.name for path in SRC.rglob("*.py") if path.name not in ("__init__.py", "__main__.py", "stage.py")]
    # one module name, one meaning (the pairs stage and the pair-record reader once shared `pairs.py`)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def layout_map() -> dict[str, str]:
    """DEVELOPERS.md's layout map: {`folder/` or `module.py`: the rest of its line (continuation lines joined)}."""
    text = (SRC.parents[1] / "DEVELOPERS.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    entries: dict[str, str] = {}
    for item in re.split(r"\n- ", "\n" + section)[1:]:
        head, _, rest = item.partition(":")
        for name in re.findall(r"`([^`]+)`", head):
            entries[name] = " ".join(rest.split("\n\n")[0].split())
    return entries


def test_the_layout_map_matches_the_tree():
    entries = layout_map()
    folders = sorted(p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert sorted(k for k in entries if k.endswith("/")) == folders
    assert sorted(k for k in entries if k.endswith(".py")) == top
    for folder in folders:  # each module of a folder named on the folder's line, and nothing that is not there
        modules = {p.relative_to(SRC / folder).as_posix() for p in (SRC / folder).rglob("*.py")
                   if p.name != "__init__.py"}
        named = set(re.findall(r"`([\w/]+\.py)`", entries[folder]))
        nested = {f"{d}{m}" for d in re.findall(r"`(\w+/)`", entries[folder])
                  for m in re.findall(r"`(\w+\.py)`", entries[folder])}
        shown = {m for m in modules if m in named or m in nested}
        assert shown == modules, f"{folder}: not in the map: {sorted(modules - shown)}"
        assert all((SRC / folder / m).is_file() or any((SRC / folder / d / m).is_file()
                   for d in re.findall(r"`(\w+)/`", entries[folder])) for m in named), folder
