"""The export stage entry point: F16 (and/or BF16) from the merged model, then each quantization, every file verified.

Output folder `gguf/`: `<name>-fp16.gguf`, `<name>-Q8_0.gguf`, ..., `Modelfile` (Ollama), `README.md` (model card)
and `manifest.json` listing every file with its size and sha256, plus (in `results`) each file's type, the llama.cpp
and medtune versions and the numbers of its checks. The folder is built under a temporary name and renamed into
place by the pipeline (RunDir.atomic), so a killed export leaves nothing at a final path and the next run starts
afresh.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.artifacts import RunDir, atomic_write_text
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.export import card, gguf, ollama, verify
from medtune.gguf_types import TYPES, file_name, ollama_choice
from medtune.models import end_of_turn_token, load_tokenizer
from medtune.ui import UI


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI, limits: verify.Limits | None = None) -> dict[str, Any]:
    """Convert, quantize, verify; write the Modelfile and the model card. Raises MedtuneError if a check fails.

    `limits` relaxes what a file must achieve (tests on random-weight models); `export.ollama: false` exports a
    model whose chat template medtune cannot express for Ollama.
    """
    limits = limits or verify.Limits()
    merged = run_dir.require("merged", "medtune merge CONFIG")
    tokenizer = load_tokenizer(str(merged))
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    name, types = cfg.export.name, cfg.export.types
    floats = [t.name for t in TYPES if t.is_float and t.name in types]
    ordered = floats + [t for t in types if t not in floats]
    results: dict[str, Any] = {"llama_cpp_version": gguf.llama_cpp_version(), "medtune_version": __version__,
                               "files": {}}

    modelfile_text = None
    if cfg.export.ollama:  # before the long steps: an unsupported chat template fails in seconds
        target = file_name(name, ollama_choice(types))
        modelfile_text, results["ollama"] = ollama.modelfile(tokenizer, target, name, cfg.chat)

    timings: dict[str, float] = {}
    for gguf_type in ordered:
        path = out / file_name(name, gguf_type)
        start = time.perf_counter()
        with ui.step(f"export {path.name}"):  # minutes for a large model: progress lines while it runs
            if gguf_type in floats:
                gguf.convert(merged, path, gguf_type.lower())
            else:
                gguf.quantize(out / file_name(name, floats[0]), path, gguf_type)
        timings[gguf_type] = round(time.perf_counter() - start, 2)
        ui.log(f"export: {path.name} ({timings[gguf_type]} s)")

    problems: list[str] = []
    warnings: list[str] = []
    reference_ppl = None
    for gguf_type in ordered:
        path = out / file_name(name, gguf_type)
        start = time.perf_counter()
        with ui.step(f"verify {path.name}"):
            metadata = verify.check_metadata(path, gguf_type, tokenizer.chat_template, eot_id)
            parity = verify.run_parity(path, merged, cfg.export.check_prompt, limits.smoke_max_tokens,
                                       logits=gguf_type in floats)
        file_problems = metadata["problems"] + verify.judge(parity, gguf_type, limits, reference_ppl)
        if reference_ppl is None:
            reference_ppl = parity["perplexity"]["value"]
        results["files"][gguf_type] = {"file": path.name, "type": gguf_type, "seconds": timings[gguf_type],
                                       "verify_seconds": round(time.perf_counter() - start, 2), "metadata": metadata,
                                       **parity, "problems": file_problems}
        problems += [f"{path.name}: {p}" for p in file_problems]
        tok = parity["tokenizer"]
        if tok["mismatches"] > tok["fatal_mismatches"]:
            rare = [e["text"] for e in tok["examples"] if not e["fatal"]]
            warnings.append(f"{path.name}: llama.cpp splits {tok['mismatches'] - tok['fatal_mismatches']} text(s) "
                            "with rare unicode (or another family's marker, read as a control token) differently "
                            f"from HF, e.g. {rare[0]!r}")
        ui.log(f"verify: {path.name}: {_summary(results['files'][gguf_type])}")
    results["problems"], results["warnings"] = problems, warnings
    for warning in dict.fromkeys(w.split(": ", 1)[1] for w in warnings):
        ui.log(f"[yellow]warning: {warning}[/]")
    if problems:
        raise MedtuneError("export: verification failed:\n  " + "\n  ".join(problems))

    if modelfile_text is not None:
        atomic_write_text(out / "Modelfile", modelfile_text)
    atomic_write_text(out / "README.md", card.model_card(cfg, run_dir, results))
    return results


def _summary(r: dict[str, Any]) -> str:
    parts = [f"tokenizer {r['tokenizer']['identical']}/{r['tokenizer']['texts']}"]
    if "logits" in r:
        parts.append(f"top-1 {r['logits']['top1_agreement']:.2%}, max |dlogit| {r['logits']['max_abs_logit_diff']}")
    change = r["perplexity"].get("relative_to_float")
    parts.append(f"ppl {r['perplexity']['value']}" + ("" if change is None else f" ({change:+.1%})"))
    parts.append(f"answer {r['runtime']['finish_reason']}")
    return ("ok: " if not r["problems"] else "FAILED: ") + ", ".join(parts)
