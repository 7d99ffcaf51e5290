"""A Qwen-shaped model (Qwen3: q_norm / k_norm; Qwen2: q/k/v biases) with random weights and Qwen's real tokenizer
through data, train, merge and export (llama.cpp's converter, quantization and every export check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import reasonmed_record, write_jsonl
from qwen_shape import FIRST_SPECIAL, build_model

from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.export import stage as export_stage
from medtune.export import verify
from medtune.pipeline import BY_NAME, run_stage
from medtune.ui import UI


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen-cache")


def _config(tmp_path: Path, base: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", [reasonmed_record(i) for i in range(24)])
    cfg = {
        "name": "qwen", "run_dir": str(tmp_path / "run"), "seed": 1,
        "base": {"model": str(base), "chat_template": "chatml"},
        "data": {"path": str(data), "max_len": 96, "val_fraction": 0.2},
        "train": {"batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1, "max_steps": 2},
        "export": {"name": "qwen", "types": ["F16", "Q4_K_M"]},
    }
    path = tmp_path / "qwen.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_the_tokenizer_is_qwens(qwen_cache, tmp_path):
    from qwen_shape import build_tokenizer
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path, qwen_cache)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # ids of Qwen2's own tokenizer.json for these texts
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [FIRST_SPECIAL, FIRST_SPECIAL + 1, FIRST_SPECIAL + 2]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_qwen_trains_merges_and_converts(arch, qwen_cache, tmp_path):
    """qwen3 is shaped as a base release (no chat template, eos <|endoftext|>) given ChatML by config; qwen2 as an
    instruct release."""
    base = build_model(tmp_path / arch, qwen_cache, arch, base=arch == "qwen3")
    cfg = load_config(_config(tmp_path, base))
    run = RunDir(cfg.run_dir)
    for name in ("data", "train", "merge"):
        run_stage(BY_NAME[name], cfg, run, UI())
    steps = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    merge = run.manifest("merged")["results"]
    assert merge["max_logit_diff"] < merge["tolerance"]
    saved = json.loads((run / "merged" / "config.json").read_text())
    assert saved["model_type"] == arch
    merged_tokenizer = json.loads((run / "merged" / "tokenizer_config.json").read_text())
    assert merged_tokenizer["eos_token"] == "<|im_end|>"  # a chat model's eos, the base's own included
    if arch == "qwen2":
        return
    # A random model neither agrees with itself at 99% top-1 in F16 nor answers and stops: relax those checks only.
    limits = verify.Limits(min_top1_agreement=0.0, smoke_max_tokens=8, require_answer=False)
    with run.atomic("gguf") as out:
        results = export_stage.run(cfg, run, out, UI(), limits=limits)
    assert results["problems"] == []
    for gguf_type in ("F16", "Q4_K_M"):
        checked = results["files"][gguf_type]
        assert checked["metadata"]["chat_template_matches"]
        assert checked["tokenizer"]["fatal_mismatches"] == 0
    assert results["files"]["F16"]["metadata"]["architecture"] == "qwen3"
    assert results["files"]["F16"]["metadata"]["eos_token_id"] == FIRST_SPECIAL + 2  # llama.cpp ends replies there
    modelfile = (run / "gguf" / "Modelfile").read_text()
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
