"""Checks run on every GGUF file an export writes; their numbers go into the export manifest.

- metadata: architecture set, the chat template equal to the HF model's, the end-of-turn token as eos;
- tensor types: `general.file_type` and every tensor's type agree with the type in the file's name;
- parity with the HF model (`medtune.export.parity`, in a child process, so a crashing llama.cpp build is
  reported, not fatal): identical token ids, F16 top-1 agreement and logit difference, perplexity of each quant
  relative to F16, and one chat answer that is non-empty and ends at the end-of-turn token.
"""

from __future__ import annotations

import json
import mmap
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from medtune.errors import MedtuneError
from medtune.export.parity import AFTER_ANSWER_TOKENS
from medtune.gguf_types import BY_NAME, TYPES


@dataclass(frozen=True)
class Limits:
    """What a file must achieve to pass; tests on random-weight models relax the ones only a trained model meets."""

    min_top1_agreement: float = 0.99  # F16/BF16 vs the HF model, over every position of the parity texts
    max_ppl_increase: dict[str, float] = field(default_factory=lambda: {t.name: t.max_ppl_increase for t in TYPES})
    smoke_max_tokens: int = 512
    require_answer: bool = True  # the chat answer must be non-empty and end at the end-of-turn token in time


# gguf-py's scalar value types -> struct format (STRING and ARRAY are read by `read_header` itself)
_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass
class Header:
    fields: dict[str, Any]  # scalars and strings; arrays as their length
    tensors: list[tuple[str, tuple[int, ...], str]]  # (name, shape, GGML type name)


def read_header(path: Path) -> Header:
    """The GGUF key/values and tensor list, without reading the token lists into Python objects.

    gguf-py's GGUFReader builds one numpy view per token and merge (seconds for a 128k vocabulary); the checks only
    need the scalars, strings and tensor types, so arrays are skipped over.
    """
    from gguf import GGMLQuantizationType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            return buf[pos - n : pos].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal pos
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == GGUFValueType.STRING:
                return string()
            if kind == GGUFValueType.ARRAY:
                item, count = take("<I"), take("<Q")
                if item in _SCALARS:
                    pos += count * struct.calcsize(_SCALARS[item])
                elif item == GGUFValueType.STRING:
                    for _ in range(count):
                        n = take("<Q")
                        pos += n
                else:
                    for _ in range(count):
                        value(item)
                return count
            raise MedtuneError(f"{path}: unknown GGUF value type {kind}; the file is damaged or newer than medtune")

        if buf[:4] != b"GGUF":
            raise MedtuneError(f"{path}: not a GGUF file (bad magic); delete it and export again")
        pos = 4
        version, n_tensors, n_fields = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise MedtuneError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        fields = {}
        for _ in range(n_fields):
            key = string()
            fields[key] = value(take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("<Q") for _ in range(take("<I")))
            kind = take("<I")
            take("<Q")  # data offset
            tensors.append((name, shape, GGMLQuantizationType(kind).name))
    return Header(fields, tensors)


def check_metadata(path: Path, gguf_type: str, chat_template: str | None, eot_id: int) -> dict[str, Any]:
    import llama_cpp

    header = read_header(path)
    histogram = Counter(kind for _, shape, kind in header.tensors if len(shape) > 1)
    vectors = Counter(kind for _, shape, kind in header.tensors if len(shape) <= 1)
    main, alternatives = BY_NAME[gguf_type].weights, BY_NAME[gguf_type].also
    expected_ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    fields = header.fields
    checks = {
        "architecture": fields.get(Keys.General.ARCHITECTURE),
        "file_type": fields.get(Keys.General.FILE_TYPE),
        "expected_file_type": expected_ftype,
        "tensor_types": dict(histogram),
        "vector_types": dict(vectors),
        "chat_template_matches": fields.get(Keys.Tokenizer.CHAT_TEMPLATE) == chat_template,
        "eos_token_id": fields.get(Keys.Tokenizer.EOS_ID),
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


def run_parity(path: Path, hf_dir: Path, prompt: str, max_tokens: int, logits: bool) -> dict[str, Any]:
    """`medtune.export.parity` on one file, in a child process; a segfaulting llama.cpp build becomes a clear error."""
    spec = {"gguf": str(path), "hf_dir": str(hf_dir), "prompt": prompt, "max_tokens": max_tokens, "logits": logits}
    proc = subprocess.run([sys.executable, "-m", "medtune.export.parity", json.dumps(spec)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        if proc.returncode < 0:
            raise MedtuneError(
                f"{path.name}: llama.cpp crashed (signal {-proc.returncode}) running this file; if it is a build "
                'for another CPU, rebuild llama-cpp-python: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install '
                f"--force-reinstall --no-cache-dir llama-cpp-python. Its last words:\n{tail}"
            )
        raise MedtuneError(f"{path.name}: the parity checks (python -m medtune.export.parity) failed on this file:\n"
                           f"{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def judge(result: dict[str, Any], gguf_type: str, limits: Limits, reference_ppl: float | None) -> list[str]:
    """Turn the parity numbers of one file into problems; adds the perplexity change vs F16 to `result`."""
    problems = []
    tokenizer = result["tokenizer"]
    if tokenizer["fatal_mismatches"]:
        problems.append(f"tokenizer: llama.cpp and HF ids differ on {tokenizer['fatal_mismatches']} ASCII or "
                        f"special-token text(s), e.g. {tokenizer['examples'][0]['text']!r}")
    logits = result.get("logits")
    if logits is not None and logits["top1_agreement"] < limits.min_top1_agreement:
        problems.append(f"top-1 agreement with the HF model is {logits['top1_agreement']:.2%} < "
                        f"{limits.min_top1_agreement:.0%} (max |logit diff| {logits['max_abs_logit_diff']})")
    ppl = result["perplexity"]
    if "hf" in ppl:
        ppl["relative_to_hf"] = round(ppl["value"] / ppl["hf"] - 1, 5)
    if reference_ppl is not None:
        ppl["relative_to_float"] = round(ppl["value"] / reference_ppl - 1, 5)
        bound = limits.max_ppl_increase.get(gguf_type)
        if bound is not None and ppl["relative_to_float"] > bound:
            problems.append(f"held-out perplexity {ppl['value']} is {ppl['relative_to_float']:+.1%} vs the float "
                            f"file (allowed {bound:+.0%}): the quantized file is broken")
    for key, where in (("runtime", ""), ("stop_probe", " (answer to the stop probe, parity.STOP_PROBE)")):
        runtime = result.get(key)
        if runtime is None or not limits.require_answer:
            continue
        if not runtime["text"].strip():
            problems.append("empty answer" + where)
        if runtime["finish_reason"] != "stop":
            problems.append(f"did not stop at the end-of-turn token within {limits.smoke_max_tokens} tokens{where}")
    after = result.get("after_answer")
    if after is not None and limits.require_answer and after["finish_reason"] != "stop":
        problems.append(f"did not stop at the end-of-turn token within {AFTER_ANSWER_TOKENS} tokens after a finished "
                        f"answer (parity.FINISHED_ANSWER), went on with {after['text'][:60]!r}")
    return problems


def is_stop_problem(problem: str) -> bool:
    """A problem of the chat answers (empty, or not ended): it makes a quantized file one not to use, not a failure."""
    return problem.startswith(("empty answer", "did not stop at the end-of-turn token"))
