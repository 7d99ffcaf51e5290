"""The model card (`README.md`) written beside the GGUF files: what the model is, how it was made, its licences.

Numbers come from the run directory's own reports (`prepared/report.json`, `adapter/train_report.json`) and from
the export's checks; evaluation runs after export, so the card says where its results will be instead of copying a
possibly stale table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medtune import DISCLAIMER, __version__
from medtune.artifacts import RunDir
from medtune.config import Config

LLAMA_3_2 = re.compile(r"llama[-_ .]?3\.2", re.IGNORECASE)
LLAMA_3_2_LICENSE = (
    "**Llama 3.2 Community License** (https://www.llama.com/llama3_2/license/). Llama 3.2 is licensed under the "
    "Llama 3.2 Community License, Copyright © Meta Platforms, Inc. All Rights Reserved. Redistribution must include "
    "a copy of that licence and the notice \"Built with Llama\", and use must follow Meta's Acceptable Use Policy "
    "(https://www.llama.com/llama3_2/use-policy/)."
)
REASONMED_TERMS = ("ReasonMed (`lingshu-medical-mllm/ReasonMed`) is released under the **Apache-2.0** licence; its "
                   "questions come from MedQA, MedMCQA, PubMedQA and MMLU, which have their own terms.")


def _base_licence(base: str) -> str:
    if LLAMA_3_2.search(base):
        return LLAMA_3_2_LICENSE
    return f"The base model's licence applies: see the base model card of `{base}`."


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


def _recommended(results: dict[str, Any]) -> dict[str, Any]:
    """The export's recommended file (medtune.export.recommend), or the Modelfile's when an older manifest has none."""
    return results.get("recommended") or {"file": results.get("ollama", {}).get("from"), "why": "the Modelfile's"}


def model_card(cfg: Config, run_dir: RunDir, results: dict[str, Any]) -> str:
    """README.md text for the export folder; `results` are the export's checks (the manifest's results)."""
    data = run_dir.read_json("prepared", "report.json")
    train = run_dir.read_json("adapter", "train_report.json")
    merge = (run_dir.manifest("merged") or {}).get("results")
    t = cfg.train
    lines = [
        f"# {cfg.export.name}",
        "",
        f"A medical question-answering model: `{cfg.base.model}` fine-tuned with LoRA by medtune {__version__}, "
        "merged, and converted to GGUF for llama.cpp, Ollama and LM Studio.",
        "",
        f"> **Medical disclaimer.** {DISCLAIMER}",
        "",
        "## Files",
        "",
        *_file_rows(results),
        "",
        f"Converted and quantized with llama.cpp from llama-cpp-python {results['llama_cpp_version']}. "
        "`manifest.json` lists every file with its size and sha256 and the numbers of every check. "
        f"Use `{_recommended(results)['file']}`: {_recommended(results)['why']} (`manifest.json`, `recommended`). "
        f"`Modelfile` runs it in Ollama: `ollama create {cfg.export.name} -f Modelfile`.",
        "",
        "## Base model",
        "",
        f"`{cfg.base.model}`" + (f" at revision `{cfg.base.revision}`" if cfg.base.revision else "") + ".",
        "",
        "## Training data",
        "",
        f"Source: `{cfg.data.dataset or cfg.data.path}`" + (f" (`{cfg.data.data_file}`)" if cfg.data.data_file else "")
        + f"; conversations capped at {cfg.data.max_len} tokens ({cfg.data.length_policy}).",
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
    if train:
        lines += ["", f"Training: {train.get('steps')} steps on {train.get('device')} ({train.get('precision')}), "
                  f"final loss {_number(train.get('final_loss'))}, validation loss "
                  f"{_number(train.get('val_loss_before'))} before and {_number(train.get('val_loss_after'))} after, "
                  f"{_number(train.get('tokens_per_s'))} tokens/s."]
    if merge:
        lines += ["", f"Merge: {merge.get('dtype')}, max |logit difference| vs base + adapter "
                  f"{_number(merge.get('max_logit_diff'))} (tolerance {merge.get('tolerance')})."]
    lines += [
        "",
        "## Evaluation",
        "",
        "Not available when these files were written: evaluation runs after export (`medtune eval CONFIG`) and "
        f"writes its table to `{run_dir / 'eval' / 'results.md'}`.",
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
