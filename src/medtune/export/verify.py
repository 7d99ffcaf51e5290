"""Checks run on every GGUF file an export writes; their numbers go into the export manifest.

- metadata: architecture set, the chat template equal to the HF model's, the end-of-turn token as eos;
- tensor types: `general.file_type` and every tensor's type agree with the type in the file's name;
- runtime: the file loads in llama.cpp (in a child process, so a crashing build is reported, not fatal) and
  answers a chat question with non-empty text that ends at the end-of-turn token.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

# Type in the file name -> (the type most weights get, types llama.cpp's recipe uses for some tensors: the K-quant
# mixes raise attn_v/ffn_down/output, and rows whose width is not a multiple of 256 fall back to legacy types).
TENSOR_TYPES: dict[str, tuple[str, set[str]]] = {
    "F16": ("F16", set()),
    "BF16": ("BF16", set()),
    "Q8_0": ("Q8_0", set()),
    "Q6_K": ("Q6_K", {"Q8_0"}),
    "Q5_K_M": ("Q5_K", {"Q6_K", "Q5_1", "Q8_0"}),
    "Q5_K_S": ("Q5_K", {"Q6_K", "Q5_1", "Q8_0"}),
    "Q4_K_M": ("Q4_K", {"Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}),
    "Q4_K_S": ("Q4_K", {"Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}),
    "Q4_0": ("Q4_0", {"Q4_1", "Q6_K", "Q8_0"}),
    "Q3_K_M": ("Q3_K", {"Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}),
    "Q2_K": ("Q2_K", {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}),
}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def check_metadata(path: Path, gguf_type: str, chat_template: str | None, eot_id: int) -> dict[str, Any]:
    import llama_cpp
    from gguf import GGUFReader

    reader = GGUFReader(path)
    histogram = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    vectors = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) <= 1)
    main, alternatives = TENSOR_TYPES[gguf_type]
    expected_ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    checks = {
        "architecture": _field(reader, "general.architecture"),
        "file_type": _field(reader, "general.file_type"),
        "expected_file_type": expected_ftype,
        "tensor_types": dict(histogram),
        "vector_types": dict(vectors),
        "chat_template_matches": _field(reader, "tokenizer.chat_template") == chat_template,
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "expected_eos_token_id": eot_id,
    }
    problems = []
    if not checks["architecture"]:
        problems.append("no general.architecture")
    if checks["file_type"] != expected_ftype:
        problems.append(f"general.file_type is {checks['file_type']}, expected {expected_ftype} ({gguf_type})")
    if histogram.get(main, 0) == 0:
        problems.append(f"no tensor of type {main}")
    stray = set(histogram) - {main} - alternatives
    if stray:
        problems.append(f"tensor types {sorted(stray)} do not belong in a {gguf_type} file")
    if not checks["chat_template_matches"]:
        problems.append("the chat template differs from the HF model's")
    if checks["eos_token_id"] != eot_id:
        problems.append(f"eos token id is {checks['eos_token_id']}, expected the end-of-turn id {eot_id}")
    checks["problems"] = problems
    return checks


def check_runtime(path: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Load and answer once in a child process; a segfaulting llama.cpp build becomes a clear error."""
    cmd = [sys.executable, "-m", "medtune.infer.smoke", str(path), prompt, str(max_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode < 0:
            raise MedtuneError(
                f"{path.name}: llama.cpp crashed (signal {-proc.returncode}) running this file; rebuild "
                'llama-cpp-python for this CPU: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall '
                "--no-cache-dir llama-cpp-python"
            )
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise MedtuneError(f"{path.name}: llama.cpp could not run this file:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["problems"] = []
    if not result["text"].strip():
        result["problems"].append("empty answer")
    if result["finish_reason"] != "stop":
        result["problems"].append(f"did not stop at the end-of-turn token within {max_tokens} tokens")
    return result
