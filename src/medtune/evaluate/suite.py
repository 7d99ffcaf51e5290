"""Several models on several benchmarks, compared in one folder: what both `medtune eval` forms run.

Output folder: `<model>/<benchmark>.jsonl` (per item: prompt, output, extracted answer, gold, correct),
`summary.json`, `results.md` (accuracy with a 95% Wilson interval, extraction failures, items/s, each model's paired
difference from the first with McNemar's exact test, and a warning per benchmark that overlaps the run's training
data) and `accuracy.png`. Per-item results are first appended to a cache folder, keyed by the model's files, the
items and the settings, so an interrupted evaluation resumes where it stopped and a changed model starts afresh.

Modes: "generate" (chain-of-thought answers: GGUF files through llama.cpp one item at a time, HF models through
transformers, batched on a GPU and one item at a time on a CPU unless `batch_size` says otherwise) or "loglik" (the
options' log-likelihood, lm-evaluation-harness style; HF models only).
"""

from __future__ import annotations

import gc
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.artifacts import atomic_write_json, fingerprint
from medtune.config import EvalConfig
from medtune.engines import open_engine
from medtune.errors import MedtuneError
from medtune.evaluate.benchmarks import Item, load_benchmark, stratified_sample
from medtune.evaluate.hf import BatchedGenerator
from medtune.evaluate.loglik import LoglikScorer
from medtune.evaluate.report import overlap, overlap_warnings, results_table, write_report
from medtune.evaluate.runner import BatchedSolver, EngineSolver, LoglikSolver, Solver, evaluate_items, read_records
from medtune.evaluate.stats import paired_comparison
from medtune.models import default_device, load_hf
from medtune.ui import UI

MODES = ("generate", "loglik")
GPU_BATCH_SIZE = 16  # HF generation and scoring on a GPU when no batch size is given (CPU generation: 1)
CPU_LOGLIK_BATCH_SIZE = 8  # scoring rows per forward pass on a CPU (lm-eval's --batch_size in the cross-check)


def check_model(label: str, path: Path, mode: str, where: str) -> None:
    """Fail before any model loads when a model can't be run in this mode (`where`: the setting that named it)."""
    if mode == "loglik" and path.suffix == ".gguf":
        raise MedtuneError(f"{where}: {label} is a GGUF file ({path}); mode 'loglik' scores the options with "
                           "transformers and needs an HF model (a model directory, a LoRA adapter directory or a hub "
                           "id): leave it out or use mode 'generate'")


def open_solvers(path: Path, mode: str, max_new_tokens: int, n_ctx: int, batch_size: int | None = None,
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
        solver = EngineSolver(open_engine(path, n_ctx=n_ctx), max_new_tokens)
    else:
        model, tokenizer = load_hf(path, device=device)
        generator = BatchedGenerator(model, tokenizer, batch_size or (GPU_BATCH_SIZE if on_gpu else 1))
        solver = BatchedSolver(generator, max_new_tokens)
    return lambda kind: solver


def folder_name(label: str) -> str:
    """A folder name for a model label (a path or hub id becomes one name)."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


def _stamp(path: Path) -> list[Any]:
    """What identifies a model's files for the per-item cache: path, size and mtime (a hub id: the id alone)."""
    if not path.exists():
        return [str(path)]
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [str(path), *([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files)]


def load_items(section: EvalConfig, seed: int) -> tuple[dict[str, list[Item]], dict[str, str]]:
    """({benchmark name: items, sampled to `limit`}, {benchmark name: kind})."""
    benches: dict[str, list[Item]] = {}
    kinds: dict[str, str] = {}
    for b in section.benchmarks:
        items = load_benchmark(b.kind, b.path)
        benches[b.name] = stratified_sample(items, section.limit, seed) if section.limit else items
        kinds[b.name] = b.kind
    return benches, kinds


def paired(correct: dict[str, dict[str, dict[str, bool]]]) -> dict[str, dict[str, Any]]:
    """{benchmark: {model: McNemar comparison with the first model}} for benchmarks that two or more models ran."""
    out: dict[str, dict[str, Any]] = {}
    benches = dict.fromkeys(b for per_model in correct.values() for b in per_model)
    for bench in benches:
        models = [m for m in correct if bench in correct[m]]
        if len(models) < 2:
            continue
        first = models[0]
        out[bench] = {m: {"reference": first, **paired_comparison(correct[first][bench], correct[m][bench]).as_dict()}
                      for m in models[1:]}
    return out


def evaluate_models(models: dict[str, Path], section: EvalConfig, out: Path, cache: Path, ui: UI, *, seed: int,
                    n_ctx: int, prepared: Path | None = None) -> dict[str, Any]:
    """Every model ({label: model file, directory or hub id}) on every benchmark of `section`; writes the reports
    into `out` and returns the summary. `prepared`: the run's data stage folder, for overlap warnings."""
    if section.mode not in MODES:
        raise MedtuneError(f"mode must be one of {list(MODES)}, got {section.mode!r}")
    if not section.benchmarks:
        raise MedtuneError("no benchmark to evaluate: give at least one {name, path, kind} multiple-choice file")
    benches, kinds = load_items(section, seed)
    cache.mkdir(parents=True, exist_ok=True)
    found = overlap(prepared, benches) if prepared is not None else {}
    summary: dict[str, Any] = {"mode": section.mode, "max_new_tokens": section.max_new_tokens, "limit": section.limit,
                               "overlap": found, "models": {}}
    correct: dict[str, dict[str, dict[str, bool]]] = {}
    for label, path in models.items():
        solver_for = open_solvers(path, section.mode, section.max_new_tokens, n_ctx, section.batch_size)
        summary["models"][label], correct[label] = {}, {}
        (out / folder_name(label)).mkdir(parents=True, exist_ok=True)
        for name, items in benches.items():
            solver = solver_for(kinds[name])
            key = fingerprint([*_stamp(path), name, [i.id for i in items], section.mode, type(solver).__name__,
                               section.max_new_tokens if section.mode == "generate" else None])
            cached = cache / f"{folder_name(label)}-{name}-{key}.jsonl"
            with ui.step(f"eval {label} {name}", total=len(items)) as task:
                summary["models"][label][name] = evaluate_items(solver, items, cached,
                                                                on_item=lambda t=task: ui.update(t, advance=1))
            records = read_records(cached)
            correct[label][name] = {item.id: bool(records[item.id]["correct"]) for item in items}
            shutil.copyfile(cached, out / folder_name(label) / f"{name}.jsonl")
        del solver_for, solver  # frees the model before the next one loads
        gc.collect()
    if len(models) > 1:
        summary["paired"] = paired(correct)
    atomic_write_json(out / "summary.json", summary)
    warnings = overlap_warnings(found)
    write_report(out, summary, warnings)
    for line in warnings:
        ui.log(f"[yellow]{line}[/]")
    ui.log(results_table(summary))
    return summary
