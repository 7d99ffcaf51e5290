"""The preference leg of the demo: configs/demo-rpo.yaml from the demo's tuned model, shortened for a CPU. Pairs are
sampled from the tuned model on its training questions and graded by their keys; RPO trains from the first step's
ln 2 + NLL; the merged model is compared with the model it started from on the demo's held-out questions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import medtune

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rpo_run(demo_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo-rpo")
    overrides = ["--set", f"run_dir={run_dir}", "--set", f"base.model={demo_run[0] / 'merged'}",
                 "--set", "pairs.limit=6", "--set", "pairs.max_new_tokens=64", "--set", "train.max_steps=2",
                 "--set", "train.batch_size=2"]
    for stage in ("pairs", "data", "train", "merge"):  # export and eval are the SFT chain's, tested there
        proc = medtune(stage, "configs/demo-rpo.yaml", *overrides, columns=200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_pairs_are_graded_samples_of_the_tuned_model(rpo_run):
    report = json.loads((rpo_run / "pairs" / "report.json").read_text())
    pairs = [json.loads(line) for line in (rpo_run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (rpo_run / "pairs" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 4 and report["pairs"] == len(pairs) > 0
    for p in pairs:  # chosen carries the key's letter, rejected another one (or none)
        assert p["chosen_answer"] == p["answer"] != p["rejected_answer"]
        assert p["prompt"][0]["content"].startswith("Please answer the following multiple-choice question")


def test_rpo_starts_at_ln2_plus_nll_and_merges(rpo_run):
    prepared = json.loads((rpo_run / "prepared" / "report.json").read_text())
    assert prepared["record_kind"] == "pairs" and prepared["records_read"] == prepared["used"] + prepared["rejected"]
    metrics = [json.loads(line) for line in (rpo_run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "loss" in m)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert first["loss"] == pytest.approx(math.log(2) + first["nll"], rel=1e-3)  # nll_weight 1: RPO
    report = json.loads((rpo_run / "adapter" / "train_report.json").read_text())
    assert report["objective"] == "dpo" and report["steps"] == 2
    assert (rpo_run / "merged" / "model.safetensors").is_file()
    assert list((rpo_run / "reference").glob("*/train.npy"))
