"""The eval stage entry point: every configured model on every configured benchmark, compared in one report.

Output folder `eval/`: `<model>/<benchmark>.jsonl` (per item: prompt, output, extracted answer, gold, correct),
`summary.json`, `results.md` (accuracy with a 95% Wilson interval, extraction failures, items/s, and a warning per
benchmark that overlaps this run's training data) and `accuracy.png` (the same accuracies as bars with error bars).
Per-item results are first written to `<run>/eval_cache/`, so an interrupted evaluation resumes where it stopped.

`eval.mode`: "generate" (chain-of-thought answers: GGUF files through llama.cpp one item at a time, HF models through
transformers, batched on a GPU and one item at a time on a CPU unless `eval.batch_size` says otherwise) or "loglik"
(the options' log-likelihood, lm-evaluation-harness style; HF models only).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.artifacts import RunDir, atomic_write_json, fingerprint
from medtune.config import Config
from medtune.engines import open_engine
from medtune.errors import MedtuneError
from medtune.evaluate.benchmarks import Item, load_benchmark, stratified_sample
from medtune.evaluate.hf import BatchedGenerator
from medtune.evaluate.loglik import LoglikScorer
from medtune.evaluate.report import overlap, overlap_warnings, results_table, write_report
from medtune.evaluate.runner import BatchedSolver, EngineSolver, LoglikSolver, Solver, evaluate_items
from medtune.gguf_types import NAMES, file_name
from medtune.models import default_device, load_hf, package_file, resolve_base
from medtune.ui import UI

MODES = ("generate", "loglik")
GPU_BATCH_SIZE = 16  # HF generation and scoring on a GPU when eval.batch_size is not set (CPU generation: 1)
CPU_LOGLIK_BATCH_SIZE = 8  # scoring rows per forward pass on a CPU (lm-eval's --batch_size in the cross-check)


def model_path(ref: str, cfg: Config, run_dir: RunDir, hf: bool = False) -> Path:
    """`Q4_K_M` (a GGUF of this run), `merged`, `base`, or a path.

    `base` is the base as given (its GGUF file if it is one), or with `hf` its transformers form (a GGUF base is
    dequantized into a cached HF directory; a hub id stays a hub id).
    """
    if ref in NAMES:
        if ref not in cfg.export.types:
            raise MedtuneError(f"eval.models: {ref} is not among export.types {cfg.export.types}")
        return run_dir.require("gguf", "medtune export CONFIG") / file_name(cfg.export.name, ref)
    if ref == "merged":
        return run_dir.require("merged", "medtune merge CONFIG")
    if ref == "base":
        spec = cfg.base.model
        if hf:
            return Path(resolve_base(spec, cfg.base.revision))
        if spec.startswith("pkg:"):
            return package_file(spec)
        return Path(spec) if spec.endswith(".gguf") else Path(resolve_base(spec, cfg.base.revision))
    path = Path(ref)
    if not path.exists():
        raise MedtuneError(f"eval.models: {ref!r} is not a GGUF type of this run, 'merged', 'base' or a path")
    return path


def eval_settings(cfg: Config) -> tuple[str, int | None]:
    """(mode, batch size or None) from the eval section."""
    mode = cfg.eval.mode
    if mode not in MODES:
        raise MedtuneError(f"eval.mode must be one of {list(MODES)}, got {mode!r}")
    batch_size = cfg.eval.batch_size
    if batch_size is not None and batch_size < 1:
        raise MedtuneError(f"eval.batch_size must be >= 1, got {batch_size}")
    return mode, batch_size


def check_model(ref: str, path: Path, mode: str) -> None:
    """Fail before any model loads when a model can't be run in this mode."""
    if mode == "loglik" and path.suffix == ".gguf":
        raise MedtuneError(f"eval.models: {ref} is a GGUF file ({path}); eval.mode 'loglik' scores the options with "
                           "transformers and needs an HF model ('merged', 'base', an HF directory or a LoRA adapter "
                           "directory): remove it from eval.models or use eval.mode: generate")


def open_solvers(path: Path, mode: str, cfg: Config, batch_size: int | None = None,
                 device: str | None = None) -> Callable[[str], Solver]:
    """Load the model once; return a function giving its solver for a benchmark kind."""
    device = device or default_device()
    on_gpu = device.startswith("cuda")
    if mode == "loglik":
        model, tokenizer = load_hf(path, device=device)
        scorer = LoglikScorer(model, tokenizer, batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_LOGLIK_BATCH_SIZE))
        return lambda kind: LoglikSolver(scorer, kind)
    solver: Solver
    if path.suffix == ".gguf":
        solver = EngineSolver(open_engine(path, n_ctx=cfg.chat.n_ctx), cfg.eval.max_new_tokens)
    else:
        model, tokenizer = load_hf(path, device=device)
        generator = BatchedGenerator(model, tokenizer, batch_size or (GPU_BATCH_SIZE if on_gpu else 1))
        solver = BatchedSolver(generator, cfg.eval.max_new_tokens)
    return lambda kind: solver


def _folder(ref: str) -> str:
    """A folder name for a model reference (a path becomes one name)."""
    return re.sub(r"[^\w.-]+", "_", ref).strip("_") or "model"


def _stamp(path: Path) -> list[Any]:
    """What identifies a model's files for the per-item cache: path, size and mtime (a hub id: the id alone)."""
    if not path.exists():
        return [str(path)]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    if not cfg.eval.benchmarks:
        raise MedtuneError("eval.benchmarks is empty: list at least one {name, path} multiple-choice file")
    mode, batch_size = eval_settings(cfg)
    paths = {ref: model_path(ref, cfg, run_dir, hf=mode == "loglik") for ref in cfg.eval.models}
    for ref, path in paths.items():
        check_model(ref, path, mode)
    benches: dict[str, list[Item]] = {}
    kinds: dict[str, str] = {}
    for b in cfg.eval.benchmarks:
        items = load_benchmark(b.kind, b.path)
        benches[b.name] = stratified_sample(items, cfg.eval.limit, cfg.seed) if cfg.eval.limit else items
        kinds[b.name] = b.kind
    cache = run_dir / "eval_cache"
    cache.mkdir(parents=True, exist_ok=True)
    found = overlap(run_dir / "prepared", benches)
    summary: dict[str, Any] = {"mode": mode, "max_new_tokens": cfg.eval.max_new_tokens, "limit": cfg.eval.limit,
                               "overlap": found, "models": {}}
    for ref, path in paths.items():
        solver_for = open_solvers(path, mode, cfg, batch_size)
        summary["models"][ref] = {}
        (out / _folder(ref)).mkdir(parents=True, exist_ok=True)
        for name, items in benches.items():
            solver = solver_for(kinds[name])
            key = fingerprint([*_stamp(path), name, [i.id for i in items], mode, type(solver).__name__,
                               cfg.eval.max_new_tokens if mode == "generate" else None])
            cached = cache / f"{_folder(ref)}-{name}-{key}.jsonl"
            task = ui.task(f"eval {ref} {name}", total=len(items))
            summary["models"][ref][name] = evaluate_items(solver, items, cached,
                                                          on_item=lambda t=task: ui.update(t, advance=1))
            shutil.copyfile(cached, out / _folder(ref) / f"{name}.jsonl")
        del solver_for, solver  # frees the model before the next one loads
    atomic_write_json(out / "summary.json", summary)
    warnings = overlap_warnings(found)
    write_report(out, summary, warnings)
    for line in warnings:
        ui.log(f"[yellow]{line}[/]")
    ui.log(results_table(summary))
    return summary
