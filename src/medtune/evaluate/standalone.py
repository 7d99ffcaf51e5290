"""`medtune eval --model ... --benchmark KIND:FILE`: evaluating any models without a pipeline config.

A model is a .gguf file, an HF model or LoRA adapter directory, or a hub id (owner/name); a benchmark is
`KIND:FILE` with KIND one of medqa, medmcqa, pubmedqa, mmlu (PubMedQA: ori_pqal.json with test_ground_truth.json
beside it). The output folder gets the eval stage's files; its `cache/` keeps the per-item results, so the same
command run again resumes and only runs the items that are missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from medtune.config import BenchmarkConfig, Config, EvalConfig
from medtune.errors import MedtuneError
from medtune.evaluate.suite import SCORED, check_model, evaluate_models
from medtune.formats.benchmarks import BENCHMARK_LOADERS
from medtune.models import package_file, resolve_base
from medtune.sampling import N_CTX
from medtune.ui import UI

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEFAULTS = EvalConfig()  # the settings a config's eval section has when it leaves them out


def parse_benchmarks(specs: list[str]) -> list[BenchmarkConfig]:
    """`KIND:FILE` specs -> benchmarks named by their kind (`KIND-<file stem>` when a kind is given twice)."""
    parsed = []
    for spec in specs:
        kind, sep, file = spec.partition(":")
        if not sep or not file or kind not in BENCHMARK_LOADERS:
            raise MedtuneError(f"--benchmark {spec!r}: expected KIND:FILE with KIND one of "
                               f"{sorted(BENCHMARK_LOADERS)}, e.g. medqa:test.jsonl")
        if not Path(file).exists():
            raise MedtuneError(f"--benchmark {spec!r}: {file}: file not found")
        parsed.append((kind, Path(file)))
    kinds = [kind for kind, _ in parsed]
    benchmarks = [BenchmarkConfig(name=kind if kinds.count(kind) == 1 else f"{kind}-{path.stem}", path=path,
                                  kind=kind) for kind, path in parsed]
    names = [b.name for b in benchmarks]
    if len(set(names)) < len(names):
        raise MedtuneError(f"--benchmark: two benchmarks would both be named {max(names, key=names.count)!r}; give "
                           "each file once")
    return benchmarks


def resolve_model(ref: str, scoring: bool = False) -> Path:
    """A .gguf file, an HF model or adapter directory, a hub id (checked on the hub unless HF_HUB_OFFLINE=1), or a
    `pkg:` GGUF as `base.model` takes it (its file; with `scoring`, its transformers form, which scoring needs)."""
    if ref.startswith("pkg:"):
        return Path(resolve_base(ref)) if scoring else package_file(ref)
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MedtuneError(f"--model {ref}: GGUF file not found")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise MedtuneError(f"--model {ref}: neither an HF model directory (config.json) nor a LoRA adapter "
                               "directory (adapter_config.json)")
        return path
    if path.exists() or not HUB_ID.fullmatch(ref) or ref.startswith("."):
        raise MedtuneError(f"--model {ref}: not a .gguf file, a model directory or a hub id (owner/name)")
    return Path(resolve_base(ref))


def run(models: list[str], benchmarks: list[str], out: Path, ui: UI, *, mode: str = DEFAULTS.mode,
        circular: bool = DEFAULTS.circular, limit: int | None = None, max_new_tokens: int | None = None,
        batch_size: int | None = None, seed: int = Config.model_fields["seed"].default,
        n_ctx: int = N_CTX) -> dict[str, Any]:
    """Evaluate `models` (labels as given) on `benchmarks` (KIND:FILE) into `out`; returns the summary."""
    if not models:
        raise MedtuneError("give at least one --model (a .gguf file, a model directory or a hub id)")
    if not benchmarks:
        raise MedtuneError("give at least one --benchmark KIND:FILE, e.g. --benchmark medqa:test.jsonl")
    if len(set(models)) < len(models):
        raise MedtuneError(f"--model {max(models, key=models.count)} is given twice")
    if circular and mode == "cloze":
        raise MedtuneError("--circular applies to --mode generate or loglik: --mode cloze shows no option letters, "
                           "so their order cannot favour one; leave --circular out")
    try:
        section = EvalConfig(benchmarks=parse_benchmarks(benchmarks), models=models, mode=mode, circular=circular,
                             limit=limit, max_new_tokens=max_new_tokens or DEFAULTS.max_new_tokens,
                             batch_size=batch_size)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise MedtuneError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    paths = {ref: resolve_model(ref, scoring=mode in SCORED) for ref in models}
    for ref, path in paths.items():
        check_model(ref, path, mode, "--model")
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_models(paths, section, out, out / "cache", ui, seed=seed, n_ctx=n_ctx)
