"""The export stage entry point: F16 (and/or BF16) from the merged model, an importance matrix from the training
conversations, then each quantization, every file verified, its divergence from F16 measured, one file recommended.

Output folder `gguf/`: `<name>-fp16.gguf`, `<name>-Q8_0.gguf`, ..., `imatrix.gguf` (when one was calibrated),
`Modelfile` (Ollama, running the recommended file), `README.md` (model card) and `manifest.json` listing every file
with its size and sha256, plus (in `results`) each file's type, the llama.cpp and medtune versions, the numbers of
its checks, its divergence from F16 and the tuning it keeps (`medtune.export.divergence`), how the importance matrix
was made or why none was (`imatrix`), and the file to use (`recommended`, `medtune.export.recommend`). The folder is
built under a temporary name and renamed into place by the pipeline (RunDir.atomic), so a killed export leaves
nothing at a final path and the next run starts afresh.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.artifacts import MERGED, PREPARED, RunDir, atomic_write_text
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.export import card, divergence, gguf, imatrix, ollama, parity, tools, verify
from medtune.export.recommend import recommend
from medtune.gguf_types import BY_NAME, TYPES, fallback, file_name, ollama_choice
from medtune.models import end_of_turn_token, load_tokenizer, package_file, resolve_base
from medtune.prepared import load_split
from medtune.ui import UI

IMATRIX_FILE = "imatrix.gguf"


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI, limits: verify.Limits | None = None) -> dict[str, Any]:
    """Convert, quantize, verify, measure; write the Modelfile and the model card. Raises MedtuneError if a check
    fails; a quantized file whose answers do not stop is kept, named in the warnings and never recommended.

    `limits` relaxes what a file must achieve (tests on random-weight models); `export.ollama: false` exports a
    model whose chat template medtune cannot express for Ollama.
    """
    limits = limits or verify.Limits()
    merged = run_dir.require(MERGED, "medtune merge CONFIG")
    prepared = run_dir.require(PREPARED, "medtune data CONFIG")
    tokenizer = load_tokenizer(str(merged))
    name, types = cfg.export.name, cfg.export.types
    floats = [t.name for t in TYPES if t.is_float and t.name in types]
    quantized = [t for t in types if t not in floats]
    results: dict[str, Any] = {"llama_cpp_version": gguf.llama_cpp_version(), "medtune_version": __version__,
                               "files": {t: {"imatrix": False} for t in floats + quantized}}
    if cfg.export.ollama:  # before the long steps: an unsupported chat template fails in seconds
        ollama.modelfile(tokenizer, file_name(name, ollama_choice(types)), name, cfg.chat)

    timings = {t: _write_file(out, name, t, lambda path, t=t: gguf.convert(merged, path, t.lower()), ui)
               for t in floats}
    reference = out / file_name(name, floats[0])
    results["imatrix"], weights = _importance_matrix(cfg, prepared, tokenizer, reference, out, ui)
    for t in quantized:
        with_matrix = weights if BY_NAME[t].uses_imatrix else None
        timings[t] = _write_file(out, name, t, lambda path, t=t, m=with_matrix: gguf.quantize(
            reference, path, t, imatrix=m), ui)
        results["files"][t]["imatrix"] = with_matrix is not None

    _verify(cfg, merged, tokenizer, floats + quantized, out, results, timings, limits, ui)
    results["divergence"] = _divergence(cfg, prepared, tokenizer, reference, {
        t: out / file_name(name, t) for t in types if t != floats[0]}, results["files"], ui)
    results["recommended"] = recommend(results["files"])
    ui.log(f"export: use {results['recommended']['file']}: {results['recommended']['why']}")
    if cfg.export.ollama:
        modelfile_text, results["ollama"] = ollama.modelfile(tokenizer, results["recommended"]["file"], name, cfg.chat)
        atomic_write_text(out / "Modelfile", modelfile_text)
    atomic_write_text(out / "README.md", card.model_card(cfg, run_dir, results))
    return results


def _write_file(out: Path, name: str, gguf_type: str, make: Any, ui: UI) -> float:
    path = out / file_name(name, gguf_type)
    start = time.perf_counter()
    with ui.step(f"export {path.name}"):  # minutes for a large model: progress lines while it runs
        make(path)
    seconds = round(time.perf_counter() - start, 2)
    ui.log(f"export: {path.name} ({seconds} s)")
    return seconds


def _importance_matrix(cfg: Config, prepared: Path, tokenizer: Any, f16: Path, out: Path,
                       ui: UI) -> tuple[dict[str, Any], tuple[Path, Path] | None]:
    """The manifest's record of the importance matrix, and (llama-quantize, the matrix) when the files use one."""
    setting = cfg.export.imatrix
    record: dict[str, Any] = {"setting": str(setting), "used": False,
                              "types": [t for t in cfg.export.types if BY_NAME[t].uses_imatrix]}
    if setting == "off" or not record["types"]:
        return {**record, "reason": "export.imatrix is off" if setting == "off" else "no type uses one"}, None
    needed = ("llama-imatrix", "llama-quantize") if setting == "on" else ("llama-quantize",)
    try:
        with ui.step("llama.cpp's tools (built once, minutes)"):
            found = tools.tools(needed)
        if setting == "on":
            text, counts = imatrix.calibration_text(prepared, tokenizer, cfg.seed)
            matrix = out / IMATRIX_FILE
            with ui.step(f"llama-imatrix on {counts['conversations']} training conversations"):
                record.update(source="the training split (prepared/train)", file=IMATRIX_FILE, **counts,
                              **imatrix.compute(found["llama-imatrix"], f16, text, counts["tokens"], matrix))
        else:
            matrix = Path(setting)
            record.update(source=str(matrix))
    except MedtuneError as exc:  # no cmake or compiler, a failed build, too little training text
        ui.log(f"[yellow]warning: export: {exc}; quantizing without an importance matrix[/]")
        return {**record, "reason": str(exc)}, None
    ui.log(f"export: importance matrix from {record['source']}" + (
        f" ({record['tokens']} tokens, {record['seconds']} s)" if setting == "on" else ""))
    return {**record, "used": True}, (found["llama-quantize"], matrix)


def _verify(cfg: Config, merged: Path, tokenizer: Any, ordered: list[str], out: Path, results: dict[str, Any],
            timings: dict[str, float], limits: verify.Limits, ui: UI) -> None:
    """Every check on every file into results["files"]; raises when a check that makes a file unusable fails."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    problems: list[str] = []
    warnings: list[str] = []
    reference_ppl = None
    for gguf_type in ordered:
        path = out / file_name(cfg.export.name, gguf_type)
        start = time.perf_counter()
        with ui.step(f"verify {path.name}"):
            metadata = verify.check_metadata(path, gguf_type, tokenizer.chat_template, eot_id)
            parity_numbers = verify.run_parity(path, merged, cfg.export.check_prompt, limits.smoke_max_tokens,
                                               logits=BY_NAME[gguf_type].is_float)
        file_problems = metadata["problems"] + verify.judge(parity_numbers, gguf_type, limits, reference_ppl)
        if reference_ppl is None:
            reference_ppl = parity_numbers["perplexity"]["value"]
        # a quantized file that does not end its answers is kept but not recommended; a float file that does not
        # means the tuning itself did not learn to stop
        stop_problems = [] if BY_NAME[gguf_type].is_float else [p for p in file_problems if verify.is_stop_problem(p)]
        file_problems = [p for p in file_problems if p not in stop_problems]
        r = results["files"].setdefault(gguf_type, {})
        r.update(file=path.name, type=gguf_type, bytes=path.stat().st_size, seconds=timings[gguf_type],
                 verify_seconds=round(time.perf_counter() - start, 2), metadata=metadata, **parity_numbers,
                 problems=file_problems, stops=not stop_problems, stop_problems=stop_problems,
                 fallback=fallback(gguf_type, metadata["tensor_types"]))
        problems += [f"{path.name}: {p}" for p in file_problems]
        warnings += [f"{path.name}: {p}; it is not recommended" for p in stop_problems]
        if r["fallback"] and r["fallback"]["most"]:
            fell = ", ".join(f"{n} {t}" for t, n in r["fallback"]["fallback_types"].items())
            warnings.append(f"{path.name}: {r['fallback']['fallback']} of {r['fallback']['matrices']} matrices are "
                            f"not {BY_NAME[gguf_type].weights} ({fell}): their rows are not a multiple of 256 values")
        tok = parity_numbers["tokenizer"]
        if tok["mismatches"] > tok["fatal_mismatches"]:
            rare = [e["text"] for e in tok["examples"] if not e["fatal"]]
            warnings.append(f"{path.name}: llama.cpp splits {tok['mismatches'] - tok['fatal_mismatches']} text(s) "
                            "with rare unicode (or another family's marker, read as a control token) differently "
                            f"from HF, e.g. {rare[0]!r}")
        ui.log(f"verify: {path.name}: {_summary(r)}")
    results["problems"], results["warnings"] = problems, warnings
    for warning in dict.fromkeys(w if "it is not recommended" in w or "matrices are not" in w
                                 else w.split(": ", 1)[1] for w in warnings):
        ui.log(f"[yellow]warning: {warning}[/]")
    if problems:
        raise MedtuneError("export: verification failed:\n  " + "\n  ".join(problems))


def _held_out(prepared: Path, tokenizer: Any) -> tuple[list[list[int]], str]:
    """The divergence check's text: the validation conversations, or parity's held-out prose without a split."""
    val = [ids.tolist() for ids, _ in load_split(prepared, "val")] if (prepared / "val.ids.npy").is_file() else []
    sequences = divergence.held_out(val)
    if sequences:
        return sequences, f"prepared/val: {len(sequences)} of {len(val)} validation conversations"
    ids = tokenizer(parity.HELD_OUT)["input_ids"]
    return divergence.held_out([ids]), "parity.HELD_OUT (the run has no validation split)"


def _base_gguf(cfg: Config, scratch: Path) -> tuple[Path, str]:
    """The base model as llama.cpp runs it: its own GGUF file, or an HF base converted to F16 into `scratch`."""
    spec = cfg.base.model
    if spec.startswith("pkg:"):
        return package_file(spec), "the base GGUF file as given"
    if spec.endswith(".gguf"):
        return Path(spec), "the base GGUF file as given"
    local = resolve_base(spec, cfg.base.revision)
    if not Path(local).is_dir():  # a hub id: the snapshot training loaded, from the local cache
        from huggingface_hub import snapshot_download

        local = snapshot_download(local, revision=cfg.base.revision)
    path = scratch / "base-fp16.gguf"
    gguf.convert(Path(local), path)
    return path, "the HF base converted to F16 for this check"


def _divergence(cfg: Config, prepared: Path, tokenizer: Any, reference: Path, files: dict[str, Path],
                results: dict[str, Any], ui: UI) -> dict[str, Any]:
    """KL divergence from the reference (F16) file and retention of every other file, into results[type]."""
    sequences, source = _held_out(prepared, tokenizer)
    start = time.perf_counter()
    record: dict[str, Any] = {"reference": reference.name, "text": source,
                              "kl_direction": "KL(P_F16 || P_file), as llama-perplexity --kl-divergence"}
    with tempfile.TemporaryDirectory() as scratch, ui.step(f"divergence from {reference.name}"):
        try:
            base, record["base_source"] = _base_gguf(cfg, Path(scratch))
        except MedtuneError as exc:  # the base cannot be converted: divergence without retention
            base, record["base_source"] = None, f"not measured: {exc}"
        numbers = divergence.measure(reference, files, base, sequences)
    record.update(seconds=round(time.perf_counter() - start, 2), reference_seconds=numbers.pop("reference_seconds"),
                  base=numbers.pop("base", None), positions=sum(len(s) - 1 for s in sequences))
    for gguf_type, n in numbers.items():
        results[gguf_type]["divergence"] = n
        if "mean_kld" in n:
            ui.log(f"divergence: {results[gguf_type]['file']}: mean KLD {n['mean_kld']:.4f}, p99 {n['p99_kld']:.4f}, "
                   f"same top {n['same_top']:.1%}, ppl {n['ppl_diff']:+.3f}"
                   + ("" if n.get("retention") is None else f", keeps {n['retention']:.1%} of the tuning"))
    return record


def _summary(r: dict[str, Any]) -> str:
    parts = [f"tokenizer {r['tokenizer']['identical']}/{r['tokenizer']['texts']}"]
    if "logits" in r:
        parts.append(f"top-1 {r['logits']['top1_agreement']:.2%}, max |dlogit| {r['logits']['max_abs_logit_diff']}")
    change = r["perplexity"].get("relative_to_float")
    parts.append(f"ppl {r['perplexity']['value']}" + ("" if change is None else f" ({change:+.1%})"))
    parts.append(f"answer {r['runtime']['finish_reason']}")
    return ("ok: " if not r["problems"] else "FAILED: ") + ", ".join(parts)
