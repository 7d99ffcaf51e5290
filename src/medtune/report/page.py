"""The report page: overview (stages, environment, config), one section per stage that ran, and the disclaimer,
as one self-contained HTML file (inline CSS and SVG; no script, no network)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import medtune.report.quality as quality
import medtune.report.training as training
from medtune import DISCLAIMER, __version__
from medtune.report.html import Raw, code, facts, join, note, number, section, table, tag, text
from medtune.report.reader import RunFiles, pick
from medtune.report.style import CSS

REPORT = "report.html"


class StageLike(Protocol):
    name: str  # the CLI command
    folder: str  # its folder in the run directory


def _pairs_section(files: RunFiles, folder: str) -> Raw:
    report = files.json(f"{folder}/report.json") or {}
    values = [(k.replace("_", " "), number(v)) for k, v in report.items() if isinstance(v, (int, float, str))]
    return section("pairs", "Preference pairs", facts(values) if values else note(f"{folder}/report.json: empty"))


# stage name -> (the section's anchor, its title, what draws it)
SECTIONS: dict[str, tuple[str, str, Callable[[RunFiles, str], Raw]]] = {
    "pairs": ("pairs", "Preference pairs", _pairs_section),
    "data": ("data", "Data", training.data_section),
    "train": ("training", "Training", training.train_section),
    "merge": ("merge", "Merge", training.merge_section),
    "export": ("export", "Export", quality.export_section),
    "eval": ("evaluation", "Evaluation", quality.eval_section),
}


def _finished(files: RunFiles, folder: str, manifest: dict[str, Any]) -> str:
    """When the stage finished: recorded by the pipeline, else the manifest's modification time (older runs)."""
    recorded = pick(manifest, "run", "finished")
    if recorded:
        return str(recorded).removesuffix(" UTC")
    stamp = (files.root / folder / "manifest.json").stat().st_mtime
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + " (file time)"


def _stage_table(files: RunFiles, stages: Sequence[StageLike]) -> Raw:
    rows = []
    for stage in stages:
        manifest = files.manifest(stage.folder)
        if manifest is None:
            rows.append([stage.name, code(f"{stage.folder}/"), "not run", "–", "–", "–"])
            continue
        seconds = pick(manifest, "run", "seconds")
        rows.append([stage.name, code(f"{stage.folder}/"), "done", _finished(files, stage.folder, manifest),
                     "not recorded" if seconds is None else f"{seconds:,.1f} s", manifest.get("medtune_version")])
    return table(["stage", "folder", "status", "finished (UTC)", "took", "medtune"], rows, [4])


def _environment(files: RunFiles, stages: Sequence[StageLike]) -> Raw:
    """Each stage's machine as its manifest recorded it (stages of one run may run on different machines)."""
    envs = {s.name: pick(files.manifest(s.folder), "run", "environment") for s in stages}
    envs = {k: v for k, v in envs.items() if v}
    if not envs:
        return note("Versions and devices were not recorded by this run's medtune (an older version).")
    distinct: dict[str, list[str]] = {}
    for name, env in envs.items():
        distinct.setdefault(repr(sorted(env.items(), key=str)), []).append(name)
    blocks = []
    for names in distinct.values():
        env = envs[names[0]]
        packages = env.get("packages") or {}
        blocks.append(join([tag("h3", "Machine of " + ", ".join(names)), facts([
            *((k.replace("_", " "), text(v)) for k, v in env.items() if k != "packages"),
            *((name, version) for name, version in packages.items())])]))
    return join(blocks)


def _config(files: RunFiles, stages: Sequence[StageLike]) -> Raw:
    import yaml

    merged: dict[str, Any] = {}
    for stage in stages:
        for key, value in (pick(files.manifest(stage.folder), "config") or {}).items():
            merged.setdefault(key, value)
    if not merged:
        return note("No stage recorded its config.")
    dump = yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, width=100)
    return tag("details", tag("summary", "Resolved config (each section as the stage that used it recorded it)"),
               tag("pre", dump))


def build(root: Path, stages: Sequence[StageLike]) -> str:
    """The report's HTML for the run folder `root`; `stages` are the pipeline's (name, folder) in order."""
    files = RunFiles(root)
    ran = [s for s in stages if files.manifest(s.folder) is not None and s.name in SECTIONS]
    body = [SECTIONS[s.name][2](files, s.folder) for s in ran]
    not_run = [s for s in stages if s not in ran and s.name != "pairs"]
    gaps = [f"{s.name} ({s.folder}/ not found)" for s in not_run] + [f"{m} (not in this run)" for m in files.missing]
    title = f"medtune run: {root.resolve().name}"
    nav = tag("nav", *(tag("a", label, href=f"#{anchor}") for anchor, label in (
        [("overview", "Overview")] + [SECTIONS[s.name][:2] for s in ran])))
    shown_stages = [s for s in stages if s.name != "pairs" or s in ran]  # pairs runs only when configured
    overview = section("overview", "Overview", _stage_table(files, shown_stages),
                       note("Not shown: " + "; ".join(gaps) + ".") if gaps else "",
                       tag("h3", "Environment"), _environment(files, ran), _config(files, ran))
    page = tag("html", tag("head", Raw('<meta charset="utf-8">'),
                           Raw('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                           tag("title", title), tag("style", Raw(CSS))),
               tag("body", tag("header", tag("h1", title), tag("p", tag("strong", "Disclaimer."), f" {DISCLAIMER}",
                                                                  class_="disclaimer"), nav),
                   tag("main", overview, *body),
                   tag("footer", tag("p", f"Written by medtune {__version__} from the files of this run folder. "
                                           f"{DISCLAIMER}"))), lang="en")
    return "<!DOCTYPE html>\n" + page + "\n"

