"""The eval stage entry point: every configured model on every configured benchmark.

Output folder `eval/`: `<model>/<benchmark>.jsonl` (per item: prompt, output, extracted answer, gold, correct),
`summary.json` and `results.md` (accuracy with a 95% Wilson interval, extraction failures, items/s).
Per-item results are first written to `<run>/eval_cache/`, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medtune import DISCLAIMER
from medtune.artifacts import RunDir, atomic_write_json, fingerprint
from medtune.config import GGUF_TYPES, Config
from medtune.errors import MedtuneError
from medtune.evaluate.benchmarks import load_benchmark, stratified_sample
from medtune.evaluate.runner import evaluate_items
from medtune.export.gguf import file_name
from medtune.infer.engines import open_engine
from medtune.models import package_file, resolve_base
from medtune.ui import UI


def model_path(ref: str, cfg: Config, run_dir: RunDir) -> Path:
    """`Q4_K_M` (a GGUF of this run), `merged`, `base` (the base as given: its GGUF file if it is one), or a path."""
    if ref in GGUF_TYPES:
        if ref not in cfg.export.types:
            raise MedtuneError(f"eval.models: {ref} is not among export.types {cfg.export.types}")
        return run_dir.require("gguf", "medtune export CONFIG") / file_name(cfg.export.name, ref)
    if ref == "merged":
        return run_dir.require("merged", "medtune merge CONFIG")
    if ref == "base":
        spec = cfg.base.model
        if spec.startswith("pkg:"):
            return package_file(spec)
        return Path(spec) if spec.endswith(".gguf") else Path(resolve_base(spec, cfg.base.revision))
    path = Path(ref)
    if not path.exists():
        raise MedtuneError(f"eval.models: {ref!r} is not a GGUF type of this run, 'merged', 'base' or a path")
    return path


def results_table(summary: dict[str, Any]) -> str:
    lines = ["| model | benchmark | n | accuracy | 95% CI | extraction failures | items/s |",
             "|---|---|---:|---:|---|---:|---:|"]
    for model, benches in summary["models"].items():
        for bench, s in benches.items():
            lines.append(f"| {model} | {bench} | {s['n']} | {s['accuracy']:.1%} | "
                         f"{s['ci95'][0]:.1%}–{s['ci95'][1]:.1%} | {s['extraction_failure_rate']:.1%} | "
                         f"{s['items_per_s'] or '-'} |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    if not cfg.eval.benchmarks:
        raise MedtuneError("eval.benchmarks is empty: list at least one {name, path} multiple-choice file")
    benches = {}
    for b in cfg.eval.benchmarks:
        items = load_benchmark(b.kind, b.path)
        benches[b.name] = stratified_sample(items, cfg.eval.limit, cfg.seed) if cfg.eval.limit else items
    cache = run_dir / "eval_cache"
    cache.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"max_new_tokens": cfg.eval.max_new_tokens, "limit": cfg.eval.limit, "models": {}}
    for ref in cfg.eval.models:
        path = model_path(ref, cfg, run_dir)
        engine = open_engine(path, n_ctx=cfg.chat.n_ctx)
        summary["models"][ref] = {}
        (out / ref).mkdir(parents=True, exist_ok=True)
        for name, items in benches.items():
            stat = path.stat()
            key = fingerprint([str(path), stat.st_size, stat.st_mtime_ns, name, [i.id for i in items],
                               cfg.eval.max_new_tokens])
            cached = cache / f"{ref}-{name}-{key}.jsonl"
            task = ui.task(f"eval {ref} {name}", total=len(items))
            summary["models"][ref][name] = evaluate_items(
                engine, items, cached, cfg.eval.max_new_tokens,
                on_item=lambda t=task: ui.update(t, advance=1),
            )
            shutil.copyfile(cached, out / ref / f"{name}.jsonl")
        del engine
    atomic_write_json(out / "summary.json", summary)
    (out / "results.md").write_text(f"{results_table(summary)}\n{DISCLAIMER}\n", encoding="utf-8")
    ui.log(results_table(summary))
    return summary
