"""The run report: `<run>/report.html`, one self-contained page drawn from the run folder's files alone.

It reads what the stages wrote (reports, manifests, metrics, summaries) and imports no stage: the pipeline writes
it after every stage, `medtune report RUN_DIR` on demand, also for a run of an older medtune.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtune.artifacts import MANIFEST, atomic_write_text
from medtune.errors import MedtuneError
from medtune.report.page import REPORT, StageLike, build

__all__ = ["REPORT", "write_report"]


def write_report(root: Path, stages: Sequence[StageLike]) -> Path:
    """Write `<root>/report.html` atomically and return its path; a folder without any stage's manifest is not a
    run (MedtuneError, exit code 2)."""
    root = Path(root)
    if not any((root / s.folder / MANIFEST).is_file() for s in stages):
        folders = ", ".join(f"{s.folder}/" for s in stages)
        raise MedtuneError(f"{root}: not a medtune run folder (none of {folders} has a {MANIFEST}); give the "
                           "run_dir of a config that has run", exit_code=2)
    path = root / REPORT
    atomic_write_text(path, build(root, stages))
    return path
