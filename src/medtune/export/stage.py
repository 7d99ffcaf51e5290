"""The export stage entry point: F16 from the merged model, then each quantization, each file verified.

Output folder `gguf/`: `<name>-fp16.gguf`, `<name>-Q8_0.gguf`, ... and `manifest.json` listing every file with its
size, sha256, type, the llama.cpp and medtune versions, and the numbers of its checks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medtune.artifacts import RunDir
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.export import gguf, verify
from medtune.models import end_of_turn_token, load_tokenizer
from medtune.ui import UI


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    merged = run_dir.require("merged", "medtune merge CONFIG")
    tokenizer = load_tokenizer(str(merged))
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    float_type = "F16" if "F16" in cfg.export.types else "BF16"
    results: dict[str, Any] = {"llama_cpp_version": gguf.llama_cpp_version(), "files": {}}
    source = out / gguf.file_name(cfg.export.name, float_type)

    start = time.perf_counter()
    gguf.convert(merged, source, float_type.lower())
    timings = {float_type: round(time.perf_counter() - start, 2)}
    ui.log(f"export: {source.name} ({timings[float_type]} s)")
    for gguf_type in cfg.export.types:
        if gguf_type == float_type:
            continue
        target = out / gguf.file_name(cfg.export.name, gguf_type)
        start = time.perf_counter()
        gguf.quantize(source, target, gguf_type)
        timings[gguf_type] = round(time.perf_counter() - start, 2)
        ui.log(f"export: {target.name} ({timings[gguf_type]} s)")

    problems = []
    for gguf_type in cfg.export.types:
        path = out / gguf.file_name(cfg.export.name, gguf_type)
        meta = verify.check_metadata(path, gguf_type, tokenizer.chat_template, eot_id)
        runtime = verify.check_runtime(path, cfg.export.check_prompt, max_tokens=512)
        problems += [f"{path.name}: {p}" for p in meta["problems"] + runtime["problems"]]
        results["files"][gguf_type] = {"file": path.name, "seconds": timings[gguf_type], "metadata": meta,
                                       "runtime": runtime}
        ui.log(f"verify: {path.name}: {'ok' if not meta['problems'] + runtime['problems'] else 'FAILED'}")
    results["problems"] = problems
    if problems:
        raise MedtuneError("export: verification failed:\n  " + "\n  ".join(problems))
    return results
