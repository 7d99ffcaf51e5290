"""The layout's import rules: no stage of `pipeline.STAGES` imports another stage or the runner above it, and no
modules import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

from medtune.pipeline import STAGES

SRC = Path(__file__).resolve().parents[1] / "src" / "medtune"
ABOVE_STAGES = ("medtune.pipeline", "medtune.cli", "medtune.summary")  # what runs the stages and prints


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
    """A stage's package or module below medtune: `medtune.data.stage` -> `medtune.data`, `medtune.pairs` (a
    module today, a package with its stage.py later) -> `medtune.pairs`."""
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
