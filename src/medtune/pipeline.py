"""Runs the stages in order and skips those whose inputs and config did not change since they last finished.

A stage's fingerprint hashes its config sections, the medtune version, the fingerprint of the stage it reads from
and the bytes of its own input files; it is stored in the stage's manifest. Nothing heavy is imported here, so
deciding that everything is up to date takes well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.artifacts import (
    ADAPTER,
    EVAL,
    GGUF,
    MERGED,
    PAIRS,
    PREPARED,
    RunDir,
    atomic_write_json,
    fingerprint,
    sha256_file,
    write_manifest,
)
from medtune.config import Config
from medtune.ui import UI


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command
    folder: str  # its folder in the run directory
    upstream: str | None  # the stage whose folder it reads
    sections: tuple[str, ...]  # config sections it depends on
    module: str


STAGES = (
    # only with a `pairs` section; then data reads pairs/pairs.jsonl (see `active` and `upstream_of`)
    Stage("pairs", PAIRS, None, ("pairs", "base", "seed"), "medtune.pairs.stage"),
    Stage("data", PREPARED, "pairs", ("base", "data", "seed"), "medtune.data.stage"),
    Stage("train", ADAPTER, "data", ("train", "seed"), "medtune.train.stage"),
    Stage("merge", MERGED, "train", ("merge", "chat"), "medtune.merge.stage"),
    Stage("export", GGUF, "merge", ("export",), "medtune.export.stage"),
    Stage("eval", EVAL, "export", ("eval", "chat"), "medtune.evaluate.stage"),
)
BY_NAME = {s.name: s for s in STAGES}


def active(stage: Stage, cfg: Config) -> bool:
    """Whether the config runs this stage: the pairs stage only with a `pairs` section."""
    return stage.name != "pairs" or cfg.pairs is not None


def active_stages(cfg: Config) -> list[Stage]:
    return [s for s in STAGES if active(s, cfg)]


def upstream_of(stage: Stage, cfg: Config) -> Stage | None:
    """The stage whose folder `stage` reads in this config (data reads nothing upstream without a pairs section)."""
    up = BY_NAME.get(stage.upstream or "")
    return up if up is not None and active(up, cfg) else None


def _file_hash(run_dir: RunDir, path: Path) -> str:
    """sha256 of an input file, remembered by (path, size, mtime) so unchanged large files are not re-read."""
    index_path = run_dir / "input_hashes.json"
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index = {}
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
    if key not in index:
        index[key] = sha256_file(path)
        atomic_write_json(index_path, index)
    return index[key]


def stage_fingerprint(stage: Stage, cfg: Config, run_dir: RunDir) -> str:
    dump = cfg.model_dump(mode="json", by_alias=True)
    parts: dict[str, Any] = {"stage": stage.name, "medtune": __version__,
                             "config": {s: dump[s] for s in stage.sections}}
    upstream = upstream_of(stage, cfg)
    if upstream is not None:
        manifest = run_dir.manifest(upstream.folder)
        parts["upstream"] = manifest["fingerprint"] if manifest else None
    if stage.name == "data" and cfg.data.path is not None:
        parts["input"] = _file_hash(run_dir, cfg.data.path)
    if stage.name == "data" and cfg.train.objective != "sft":  # it prepares pairs, not conversations
        parts["records"] = "pairs"
    if stage.name == "eval" or (stage.name == "data" and cfg.data.contamination != "ignore"):
        # the data stage checks records against the benchmarks: a changed benchmark file changes its result
        parts["inputs"] = [_file_hash(run_dir, b.path) for b in cfg.eval.benchmarks]
    if stage.name == "export" and isinstance(cfg.export.imatrix, Path):  # a new matrix in the same file re-exports
        parts["imatrix"] = _file_hash(run_dir, cfg.export.imatrix)
    if stage.name == "pairs" and cfg.pairs is not None:
        # its questions, the benchmarks it refuses questions of, and the sampling model's own fingerprint when the
        # model is an earlier run's merged/ folder (rebuilt there, its samples here are stale)
        questions = cfg.pairs.questions
        parts["questions"] = _file_hash(run_dir, questions) if questions.is_file() else str(questions)
        parts["benchmarks"] = [[b.name, b.kind, _file_hash(run_dir, b.path)] for b in cfg.eval.benchmarks]
        model_manifest = Path(cfg.pairs.model or cfg.base.model) / "manifest.json"
        if model_manifest.is_file():
            parts["model"] = json.loads(model_manifest.read_text(encoding="utf-8")).get("fingerprint")
    return fingerprint(parts)


def first_process() -> bool:
    """False in the other processes of a multi-GPU launch: the first one writes the results and talks to the user."""
    return os.environ.get("RANK", "0") == "0"


def release_memory() -> None:
    """Return the heap a finished stage freed to the system. glibc keeps freed blocks in its arenas: after the demo's
    training the process stayed at 5.5 GB resident (0.47 GB after this), and every later stage ran with it."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL(None).malloc_trim(0)


PACKAGES = ("torch", "transformers", "peft", "accelerate", "llama-cpp-python", "gguf", "numpy")  # versions recorded


def environment() -> dict[str, Any]:
    """The machine a stage ran on, for its manifest: Python, platform, CPUs, accelerator, library versions (read
    from package metadata; nothing is imported for it)."""
    import platform
    from importlib import metadata

    packages = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    torch = sys.modules.get("torch")  # a stage that used torch has imported it; asking costs nothing then
    device = "cpu"
    if torch is not None and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpu_count": os.cpu_count(), "device": device, "packages": packages}


def _utc(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_stage(stage: Stage, cfg: Config, run_dir: RunDir, ui: UI) -> dict[str, Any]:
    """Run one stage into a temporary folder; it replaces the stage's folder only when complete."""
    module = importlib.import_module(stage.module)
    try:
        if not first_process():  # the first process writes the results
            with tempfile.TemporaryDirectory() as scratch:
                return module.run(cfg, run_dir, Path(scratch), ui)
        fp = stage_fingerprint(stage, cfg, run_dir)
        started, clock = time.time(), time.perf_counter()
        with run_dir.atomic(stage.folder) as out:
            results = module.run(cfg, run_dir, out, ui)
            dump = cfg.model_dump(mode="json", by_alias=True)
            run = {"started": _utc(started), "finished": _utc(time.time()),
                   "seconds": round(time.perf_counter() - clock, 1), "environment": environment()}
            write_manifest(out, stage.name, fp, {s: dump[s] for s in stage.sections}, results, run)
        after_stage(stage, cfg, run_dir, ui)
        return results
    finally:
        release_memory()


def after_stage(stage: Stage, cfg: Config, run_dir: RunDir, ui: UI) -> None:
    """Bring the run's documents up to date: the model card gets the evaluation once it exists, and report.html
    shows every stage that has run."""
    if stage.name == "eval" and run_dir.manifest(BY_NAME["export"].folder) is not None:
        from medtune.export.card import refresh_card

        refresh_card(cfg, run_dir)
    write_run_report(run_dir, ui)


def write_run_report(run_dir: RunDir, ui: UI) -> Path | None:
    """report.html of the run; a failure to draw it is reported, not raised: the stage's results are already safe."""
    from medtune.report import write_report

    try:
        return write_report(run_dir.root, STAGES)
    except Exception as exc:  # noqa: BLE001 - a view of the results must not fail the run that made them
        ui.log(f"[yellow]warning: report.html not written ({type(exc).__name__}: {exc})[/]")
        return None


def run_all(cfg: Config, run_dir: RunDir, ui: UI, force: bool = False) -> dict[str, str]:
    """Every stage in order; returns {stage: "ran" | "up to date"}."""
    status = {}
    stages = active_stages(cfg)
    if first_process() and any(stage.name == "export" and (force or not run_dir.is_current(
            stage.folder, stage_fingerprint(stage, cfg, run_dir))) for stage in stages):
        from medtune.export.gguf import converter_dir

        # The converter comes from the package index on first use: a missing network shows now, not after training.
        converter_dir()
    for stage in stages:
        if not force and run_dir.is_current(stage.folder, stage_fingerprint(stage, cfg, run_dir)):
            status[stage.name] = "up to date"
            ui.log(f"{stage.name}: up to date, skipped")
            continue
        ui.log(f"[bold]{stage.name}[/]: running")
        run_stage(stage, cfg, run_dir, ui)
        status[stage.name] = "ran"
    return status
