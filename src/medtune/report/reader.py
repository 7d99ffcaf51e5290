"""Reads a run folder's files for the report, tolerating a run from an older medtune (files or keys missing).

Every file the report wanted and did not find is remembered (`missing`), so the page can name what it could not
show instead of failing or leaving it out silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.artifacts import RunDir


class RunFiles:
    """One run folder: JSON and JSONL files by their place inside the run, and the list of those not found."""

    def __init__(self, root: Path) -> None:
        self.run = RunDir(root)
        self.root = Path(root)
        self.missing: list[str] = []

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def _note_missing(self, rel: str) -> None:
        if rel not in self.missing:
            self.missing.append(rel)

    def json(self, rel: str, required: bool = True) -> Any:
        """The parsed file `rel` (a path inside the run), or None; a file the report expected is noted missing."""
        path = self.root / rel
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if required:
                self._note_missing(rel)
            return None

    def jsonl(self, rel: str, limit: int | None = None, required: bool = True) -> list[dict[str, Any]] | None:
        """The first `limit` records of a JSONL file (all without a limit), or None when it can't be read."""
        path = self.root / rel
        records: list[dict[str, Any]] = []
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if limit is not None and len(records) >= limit:
                        break
                    if line.strip():
                        records.append(json.loads(line))
        except (OSError, ValueError):
            if required:
                self._note_missing(rel)
            return None
        return records

    def manifest(self, folder: str) -> dict[str, Any] | None:
        return self.run.manifest(folder)

    def file_entry(self, folder: str, name: str) -> dict[str, Any] | None:
        """A file's entry (path, bytes, sha256) in its stage's manifest."""
        for entry in (self.manifest(folder) or {}).get("files", []):
            if entry.get("path") == name:
                return entry
        return None


def pick(data: Any, *path: str) -> Any:
    """data[path[0]][path[1]]... or None where a level is missing (older runs lack newer keys)."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def item_folder(eval_dir: Path, model: str) -> Path | None:
    """The per-item folder of a model label inside an eval folder (a path or hub id is written under a sanitized
    name, so labels are compared by their word characters)."""
    import re

    if not eval_dir.is_dir():
        return None
    wanted = re.sub(r"\W", "", model)
    for path in sorted(eval_dir.iterdir()):
        if path.is_dir() and (path.name == model or re.sub(r"\W", "", path.name) == wanted):
            return path
    return None


def key_baseline(items: list[dict[str, Any]]) -> tuple[str, float] | None:
    """The most common answer key of evaluated items and its share: the accuracy of always giving that answer."""
    keys = [str(i["gold"]) for i in items if i.get("gold") is not None]
    if not keys:
        return None
    best = max(sorted(set(keys)), key=keys.count)
    return best, keys.count(best) / len(keys)


def constant_answer(eval_dir: Path, model: str, bench: str, row: dict[str, Any]) -> tuple[str | None, float | None]:
    """(answer, accuracy) of always giving the most common answer on a model's items: the summary row's own figure
    (`always_most_common_answer`, a number or {answer, accuracy}) when it has one, else counted from the keys in
    the per-item file."""
    value = row.get("always_most_common_answer")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None, float(value)
    if isinstance(value, dict):
        accuracy = next((value[k] for k in ("accuracy", "acc", "share", "value")
                         if isinstance(value.get(k), (int, float))), None)
        return next((str(value[k]) for k in ("answer", "letter", "key") if k in value), None), accuracy
    folder = item_folder(eval_dir, model)
    path = folder / f"{bench}.jsonl" if folder else None
    if path is None or not path.is_file():
        return None, None
    with open(path, encoding="utf-8") as fh:
        found = key_baseline([json.loads(line) for line in fh if line.strip()])
    return found if found else (None, None)
