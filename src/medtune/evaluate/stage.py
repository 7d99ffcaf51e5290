"""The eval stage entry point: the run's models (`eval.models`) on the configured benchmarks, compared in one report.

`eval.models` names GGUF types of this run (`Q4_K_M`: its file in gguf/), `merged`, `base`, or paths. Only GGUF
types need gguf/; `merged` needs merged/. Output folder `eval/` is what `suite.evaluate_models` writes; per-item
results are cached in `<run>/eval_cache/`, so an interrupted evaluation resumes where it stopped. With mode
generate, `eval.loglik_models` are also scored by the options' log-likelihood on the same items, reported the same
way in `eval/loglik/`: by their letters (`eval.loglik_formulation: letters`) or by their texts (`cloze`, the
formulation a small model can be measured in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.artifacts import GGUF, MERGED, PREPARED, RunDir
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.evaluate.suite import SCORED, check_model, evaluate_models
from medtune.gguf_types import NAMES, file_name
from medtune.models import package_file, resolve_base
from medtune.ui import UI


def model_path(ref: str, cfg: Config, run_dir: RunDir, hf: bool = False) -> Path:
    """`Q4_K_M` (a GGUF of this run), `merged`, `base`, or a path.

    `base` is the base as given (its GGUF file if it is one), or with `hf` its transformers form (a GGUF base is
    dequantized into a cached HF directory; a hub id stays a hub id); `base-hf` is always that transformers form
    (the base on the same engine as `merged`).
    """
    if ref in NAMES:
        if ref not in cfg.export.types:
            raise MedtuneError(f"eval.models: {ref} is not among export.types {cfg.export.types}")
        return run_dir.require(GGUF, "medtune export CONFIG") / file_name(cfg.export.name, ref)
    if ref == "merged":
        return run_dir.require(MERGED, "medtune merge CONFIG")
    if ref in ("base", "base-hf"):
        spec = cfg.base.model
        if hf or ref == "base-hf":
            return Path(resolve_base(spec, cfg.base.revision))
        if spec.startswith("pkg:"):
            return package_file(spec)
        return Path(spec) if spec.endswith(".gguf") else Path(resolve_base(spec, cfg.base.revision))
    path = Path(ref)
    if not path.exists():
        raise MedtuneError(f"eval.models: {ref!r} is not a GGUF type of this run, 'merged', 'base' or a path")
    return path


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    if not cfg.eval.benchmarks:
        raise MedtuneError("eval.benchmarks is empty: list at least one {name, path} multiple-choice file")
    scoring = cfg.eval.mode in SCORED
    models = {ref: model_path(ref, cfg, run_dir, hf=scoring) for ref in cfg.eval.models}
    for ref, path in models.items():
        check_model(ref, path, cfg.eval.mode, "eval.models")
    # the log-likelihood view beside generation: it does not depend on a model writing its answer in a findable form
    scored = {} if scoring else {ref: model_path(ref, cfg, run_dir, hf=True) for ref in cfg.eval.loglik_models}
    view = "cloze" if cfg.eval.loglik_formulation == "cloze" else "loglik"
    for ref, path in scored.items():
        check_model(ref, path, view, "eval.loglik_models")
    summary = evaluate_models(models, cfg.eval, out, run_dir / "eval_cache", ui, seed=cfg.seed, n_ctx=cfg.chat.n_ctx,
                              prepared=run_dir / PREPARED)
    if scored:
        section = cfg.eval.model_copy(update={"mode": view, "models": list(scored),
                                              "circular": cfg.eval.circular and view == "loglik"})
        summary["loglik"] = evaluate_models(scored, section, out / "loglik", run_dir / "eval_cache", ui, seed=cfg.seed,
                                            n_ctx=cfg.chat.n_ctx, prepared=run_dir / PREPARED)
    return summary
