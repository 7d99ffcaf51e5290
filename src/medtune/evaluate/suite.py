"""Several models on several benchmarks, compared in one folder: what both `medtune eval` forms run.

Output folder: `<model>/<benchmark>.jsonl` (per item: prompt, output, extracted answer, gold, correct),
`summary.json`, `results.md` (accuracy with a 95% Wilson interval, extraction failures, items/s, each model's paired
difference from the first with McNemar's exact test, and a warning per benchmark that overlaps the run's training
data) and `accuracy.png`. Per-item results are first appended to a cache folder, keyed by the model's files, the
items and the settings, so an interrupted evaluation resumes where it stopped and a changed model starts afresh.

Modes: "generate" (chain-of-thought answers: GGUF files through llama.cpp one item at a time, HF models through
transformers, batched on a GPU and one item at a time on a CPU unless `batch_size` says otherwise), "loglik" (the
option letters' log-likelihood, lm-evaluation-harness style; HF models only) or "cloze" (the option texts'
log-likelihood, no letters shown; HF models only). `circular` also asks every item under each circular shift of its
options. Each mode gives several formulations (`medtune.evaluate.formulations`); summary.json's `rows` has one row
per model, benchmark and formulation, with the answer shares, the keys' shares, RStd, the score of always giving
the most common answer and McNemar's p against the first model and against that constant answer.
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
from medtune.evaluate.formulations import (
    NOT_APPLICABLE,
    PRIMARY,
    applies,
    calibration_ids,
    constant_answer,
    correct_map,
    items_to_ask,
    measure,
    views,
)
from medtune.evaluate.hf import BatchedGenerator
from medtune.evaluate.loglik import LoglikScorer
from medtune.evaluate.report import overlap, overlap_warnings, results_table, write_report
from medtune.evaluate.runner import (
    BatchedSolver,
    ClozeSolver,
    EngineSolver,
    LoglikSolver,
    Solver,
    evaluate_items,
    read_records,
    summarize,
)
from medtune.evaluate.sample import stratified_sample
from medtune.evaluate.stats import answer_shares, paired_comparison
from medtune.formats.benchmarks import load_benchmark
from medtune.formats.choice import PUBMEDQA_OPTIONS, Item
from medtune.models import default_device, load_hf
from medtune.ui import UI

MODES = ("generate", "loglik", "cloze")
SCORED = ("loglik", "cloze")  # modes that score options with transformers (HF models only)
RECORDS = 2  # the per-item record layout: a cache written with another layout is not reused
GPU_BATCH_SIZE = 16  # HF generation and scoring on a GPU when no batch size is given (CPU generation: 1)
CPU_LOGLIK_BATCH_SIZE = 8  # scoring rows per forward pass on a CPU (lm-eval's --batch_size in the cross-check)


def check_model(label: str, path: Path, mode: str, where: str) -> None:
    """Fail before any model loads when a model can't be run in this mode (`where`: the setting that named it)."""
    if mode in SCORED and path.suffix == ".gguf":
        raise MedtuneError(f"{where}: {label} is a GGUF file ({path}); mode {mode!r} scores the options with "
                           "transformers and needs an HF model (a model directory, a LoRA adapter directory or a hub "
                           "id): leave it out or use mode 'generate'")


def open_solvers(path: Path, mode: str, max_new_tokens: int, n_ctx: int, batch_size: int | None = None,
                 device: str | None = None) -> Callable[[str], Solver]:
    """Load the model once; return a function giving its solver for a benchmark kind."""
    device = device or default_device()
    on_gpu = device.startswith("cuda")
    if mode in SCORED:
        model, tokenizer = load_hf(path, device=device)
        scorer = LoglikScorer(model, tokenizer, batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_LOGLIK_BATCH_SIZE))
        scoring = ClozeSolver if mode == "cloze" else LoglikSolver
        return lambda kind: scoring(scorer, kind)
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


def benchmark_facts(items: list[Item], kind: str, mode: str, circular: bool, seed: int) -> dict[str, Any]:
    """What a benchmark's rows are measured against: its keys' shares, the constant answer, what does not apply."""
    names = answer_names(items, kind)
    letter = constant_answer(items)
    count = sum(item.answer == letter for item in items)
    facts: dict[str, Any] = {
        "kind": kind, "n": len(items),
        "gold_shares": answer_shares([names[item.answer] for item in items], list(names.values()), none=False),
        "always_most_common_answer": {"answer": names[letter], "letter": letter, "correct": count,
                                      "accuracy": count / len(items) if items else 0.0, "n": len(items)},
        "not_applicable": {}}
    if not applies(kind):
        wanted = [f"{mode}-circular"] if circular and mode != "cloze" else []
        facts["not_applicable"] = dict.fromkeys(wanted + (["loglik-pride"] if mode == "loglik" else []),
                                                NOT_APPLICABLE)
    elif mode == "loglik":
        facts["calibration_ids"] = calibration_ids(items, seed)
    return facts


def answer_names(items: list[Item], kind: str) -> dict[str, str]:
    """{letter: the name answer shares use}: the letter itself, or PubMedQA's label (yes, no, maybe)."""
    if not applies(kind):
        return dict(PUBMEDQA_OPTIONS)
    return {letter: letter for letter in sorted({letter for item in items for letter in item.options})}


def compare_rows(rows: list[dict[str, Any]], correct: dict[tuple[str, str, str], dict[str, bool]]) -> None:
    """Each row's McNemar p against the first model's row of the same benchmark and formulation (None for it)."""
    first: dict[tuple[str, str], str] = {}
    for row in rows:
        reference = first.setdefault((row["benchmark"], row["formulation"]), row["model"])
        row["mcnemar_p_vs_first"] = None if reference == row["model"] else paired_comparison(
            correct[(reference, row["benchmark"], row["formulation"])],
            correct[(row["model"], row["benchmark"], row["formulation"])]).p_value
        row["first_model"] = reference


def _measured(items: list[Item], kind: str, section: EvalConfig, records: dict[str, dict[str, Any]],
              facts: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, bool]]]:
    """The rows of every formulation of this run, and each one's {item id: correct}."""
    names = answer_names(items, kind)
    letter = facts["always_most_common_answer"]["letter"]
    rows, correct = [], {}
    for view in views(items, kind, section.mode, records, facts.get("calibration_ids", ())):
        rows.append(measure(view, names, letter, labels=not applies(kind)))
        correct[view.formulation] = correct_map(view)
    return rows, correct


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
    facts = {name: benchmark_facts(items, kinds[name], section.mode, section.circular, seed)
             for name, items in benches.items()}
    summary: dict[str, Any] = {"mode": section.mode, "circular": section.circular,
                               "max_new_tokens": section.max_new_tokens, "limit": section.limit, "overlap": found,
                               "benchmarks": facts, "always_most_common_answer": {
                                   name: f["always_most_common_answer"] for name, f in facts.items()},
                               "models": {}, "rows": []}
    correct: dict[tuple[str, str, str], dict[str, bool]] = {}
    for label, path in models.items():
        solver_for = open_solvers(path, section.mode, section.max_new_tokens, n_ctx, section.batch_size)
        summary["models"][label] = {}
        (out / folder_name(label)).mkdir(parents=True, exist_ok=True)
        for name, items in benches.items():
            solver = solver_for(kinds[name])
            asked = items_to_ask(items, kinds[name], section.mode, section.circular, seed)
            key = fingerprint([*_stamp(path), name, [i.id for i in asked], section.mode, type(solver).__name__,
                               section.max_new_tokens if section.mode == "generate" else None, RECORDS])
            cached = cache / f"{folder_name(label)}-{name}-{key}.jsonl"
            with ui.step(f"eval {label} {name}", total=len(asked)) as task:
                ran = evaluate_items(solver, asked, cached, on_item=lambda t=task: ui.update(t, advance=1))
            records = read_records(cached)
            rows, per_formulation = _measured(items, kinds[name], section, records, facts[name])
            for row in rows:
                summary["rows"].append({"model": label, "benchmark": name, **row})
                correct[(label, name, row["formulation"])] = per_formulation[row["formulation"]]
            primary = next(row for row in rows if row["formulation"] == PRIMARY[section.mode])
            summary["models"][label][name] = {**summarize([records[i.id] for i in items], section.mode, 0, 0.0),
                                              **{k: v for k, v in primary.items() if k != "calibration_ids"},
                                              "items_per_s": ran["items_per_s"], "asked": len(asked)}
            shutil.copyfile(cached, out / folder_name(label) / f"{name}.jsonl")
        del solver_for, solver  # frees the model before the next one loads
        gc.collect()
    compare_rows(summary["rows"], correct)
    if len(models) > 1:
        summary["paired"] = paired({label: {name: correct[(label, name, PRIMARY[section.mode])] for name in benches}
                                    for label in models})
    atomic_write_json(out / "summary.json", summary)
    warnings = overlap_warnings(found)
    write_report(out, summary, warnings)
    for line in warnings:
        ui.log(f"[yellow]{line}[/]")
    ui.log(results_table(summary))
    return summary
