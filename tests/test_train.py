"""The training engine on a tiny model: exact resume after SIGKILL, the non-finite guard, observability, dry run."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import medtune, reasonmed_record, write_jsonl

from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.pipeline import BY_NAME, run_stage
from medtune.ui import UI

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def preference_pairs(n: int) -> list[dict]:
    """Pairs on the tiny config's questions: the record's own reply chosen, the same reply ending in another letter
    rejected."""
    out = []
    for i in range(n):
        record = reasonmed_record(i)
        right = record["output"].rsplit("The answer is ", 1)[1][0]
        wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
        out.append({"prompt": record["instruction"], "chosen": record["output"],
                    "rejected": record["output"].replace(f"it is {right}", f"it is {wrong}")
                    .replace(f"The answer is {right}", f"The answer is {wrong}")})
    return out


def configure(tiny_config: Path, run_dir: Path, objective: str = "sft", **train) -> Path:
    """A run config under `run_dir`; a dpo/orpo objective trains on pairs made from the same questions."""
    raw = yaml.safe_load(tiny_config.read_text())
    raw["run_dir"] = str(run_dir)
    if objective != "sft":
        raw["data"]["path"] = str(write_jsonl(run_dir.with_suffix(".pairs.jsonl"), preference_pairs(24)))
        raw["train"]["objective"] = objective
    raw["train"] |= {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "checkpoint_steps": 3,
                     "keep_checkpoints": 2, "threads": 1, "eval_steps": 10} | train
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "adapter" / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]


# Loaded by every Python process of a run started with this folder on PYTHONPATH: the first process, as it begins
# the work of step KILL_AT (mid-training, not at a checkpoint), SIGKILLs the launcher if there is one, else
# itself. Under a launcher it then waits: the launcher's death alone must end it and every other process (they are
# in sessions of their own), or the test finds them still running.
KILLER = """
import os, signal, time
from medtune.train import engine

_real, _calls = engine.backward_step, [0]


def _killing(setup, objective, batches, units):
    if os.environ.get("RANK", "0") == "0":
        _calls[0] += 1
        if _calls[0] >= int(os.environ["KILL_AT"]):
            if "LOCAL_RANK" in os.environ:
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(60)
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(setup, objective, batches, units)


engine.backward_step = _killing
"""


def processes_running(config: Path) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(config).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("objective,processes", [("sft", 1), ("sft", 2), ("dpo", 1)])
def test_killed_run_resumes_to_the_same_losses_and_adapter(tiny_config, tmp_path, objective, processes):
    """With 2 processes each one's RNG state (LoRA dropout) is restored, not the first one's. A DPO run reads its
    reference log-probabilities back instead of computing them again."""
    gpus = ("--gpus", str(processes))
    straight = configure(tiny_config, tmp_path / "straight", objective)
    killed = configure(tiny_config, tmp_path / "killed", objective)
    for cfg in (straight, killed):
        assert medtune("data", str(cfg)).returncode == 0
    assert medtune("train", str(straight), *gpus).returncode == 0

    # checkpoints every 3 steps: the last one is step (kill_at-1)//3*3; each case has its own kill step, seeded
    kill_at = random.Random(f"{objective}-{processes}").randint(4, 20)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), *sys.path]), KILL_AT=str(kill_at))
    # output to a file, not a pipe: reading a pipe to its end would wait for every process that holds it
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "train", str(killed), *gpus], cwd=ROOT,
                                env=env, stdout=log, stderr=log, start_new_session=True)
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    deadline = time.time() + 30
    while processes_running(killed) and time.time() < deadline:  # no orphan goes on training
        time.sleep(0.1)
    assert not processes_running(killed)
    assert not (tmp_path / "killed" / "adapter").exists()  # nothing at a final path
    resumed = medtune("train", str(killed), *gpus)
    out, err = resumed.stdout, resumed.stderr
    assert resumed.returncode == 0, err
    assert "resuming from" in out
    assert ("reference log-probabilities" in out) is False  # computed before the kill, read back

    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert [s for s, _ in losses(tmp_path / "killed")] == list(range(1, STEPS + 1))
    a = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    report = json.loads((tmp_path / "killed" / "adapter" / "train_report.json").read_text())
    assert report["resumed_from_step"] == (kill_at - 1) // 3 * 3
    assert report["world_size"] == processes
    assert len(list((tmp_path / "killed" / "checkpoints").glob("*/step-*"))) == 2  # keep_checkpoints


def test_observability_files(tiny_config, tmp_path):
    cfg = load_config(configure(tiny_config, tmp_path / "run", max_steps=12))
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    run_stage(BY_NAME["train"], cfg, run, UI())
    adapter = run / "adapter"
    metrics = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    assert [s for s, _ in val] == [0, 10, 12]
    assert all(k in metrics[1] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch"))
    assert list((adapter / "tensorboard").glob("events.out.tfevents.*"))
    assert (adapter / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    import torch

    from medtune.train.objectives.sft import SFT

    cfg = load_config(configure(tiny_config, tmp_path / "run", max_steps=10))
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    real = SFT.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        loss, metrics = real(self, model, batch)
        calls["n"] += model.training
        if model.training and calls["n"] > 2 * 4:  # 2 micro-batches a step: NaN from step 5 on
            loss = loss * torch.tensor(float("nan"))
        return loss, metrics

    monkeypatch.setattr(SFT, "loss", poisoned)
    expected = "loss is nan at step 5; stopped. The last good checkpoint is .*step-00000003"
    with pytest.raises(MedtuneError, match=expected):
        run_stage(BY_NAME["train"], cfg, run, UI())
    assert not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("*/step-*")) == ["step-00000003"]


@pytest.mark.parametrize("attention", ["varlen", "flex_attention"])
def test_gpu_only_attention_is_refused_on_cpu(tiny_config, tmp_path, attention):
    cfg = load_config(configure(tiny_config, tmp_path / "run", max_steps=2, attention=attention))
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    with pytest.raises(MedtuneError, match=f"train.attention {attention} trains on a CUDA GPU only"):
        run_stage(BY_NAME["train"], cfg, run, UI())


@pytest.mark.parametrize("processes", [1, 2])
def test_dry_run_plans_without_training(tiny_config, tmp_path, processes):
    cfg = configure(tiny_config, tmp_path / "run")
    proc = medtune("train", str(cfg), "--dry-run", "--gpus", str(processes))
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    for key in ("tokens_per_epoch", "steps", "measured_tokens_per_s", "expected_hours", "peak_memory_gib"):
        assert out.count(key) == 1, out  # one plan, from the first process
    assert re.search(rf"processes +│ {processes} ", out), out
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_says_whether_it_fits_before_loading(tiny_config, tmp_path):
    """The memory estimate per process (weights, LoRA + optimizer, activations, head) against the device's memory
    comes first; a run far too large for it is answered without loading the base or timing a step."""
    cfg = configure(tiny_config, tmp_path / "run", strategy="fsdp")
    proc = medtune("train", str(cfg), "--dry-run", "--gpus", "2")
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert out.count("train: estimated peak") == 1, out
    assert re.search(r"fits +│ True", out) and "fsdp_gathered_layers" in out, out
    assert out.index("train: estimated peak") < out.index("measured_tokens_per_s")
    huge = configure(tiny_config, tmp_path / "huge", batch_size=10**6)
    proc = medtune("train", str(huge), "--dry-run")
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert "it does not fit" in out and re.search(r"fits +│ False", out), out
    assert re.search(r"measured_tokens_per_s +│ None", out), out


def test_memory_estimate_of_the_large_shapes():
    """Weights per GPU as the shape's size says: Llama-3.1-70B in bf16 is 131 GiB (too much for one 140 GiB
    card with anything else), about a quarter of that in NF4, half of it per GPU over two."""
    import unittest.mock

    import torch
    from transformers import LlamaConfig

    from medtune.config import Config
    from medtune.train.memory import estimate

    shape = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    cfg = Config.model_validate({"name": "x", "run_dir": "r", "base": {"model": "x/y"},
                                 "data": {"path": "d.jsonl", "max_len": 512},
                                 "train": {"batch_size": 1, "strategy": "fsdp", "qlora": True,
                                           "gradient_checkpointing": True},
                                 "export": {"name": "x"}})
    cuda = torch.device("cuda", 0)
    with unittest.mock.patch("medtune.train.memory.device_memory_gib", return_value=139.8):
        plan = estimate(cfg, shape, "bf16", 2, cuda)
        whole = estimate(cfg.model_copy(update={"train": cfg.train.model_copy(update={"qlora": False})}), shape,
                         "bf16", 1, cuda)
    assert plan["base_params"] == pytest.approx(70.55e9, rel=1e-3)
    assert whole["per_process_gib"]["weights"] == pytest.approx(70.55e9 * 2 / 2**30, rel=1e-2)
    assert 14 < plan["per_process_gib"]["weights"] < 22 and plan["fits"]
    assert not whole["fits"]


@pytest.mark.parametrize("strategy,objective", [("ddp", "sft"), ("fsdp", "sft"), ("ddp", "dpo")])
def test_two_processes_match_one_at_the_same_global_batch(tiny_config, tmp_path, strategy, objective):
    """torchrun (gloo on CPU), replicated or sharded base: the same micro-batches per step give the same losses."""
    curves, weights = {}, {}
    for procs, accum in ((1, 2), (2, 1)):
        cfg = configure(tiny_config, tmp_path / f"run{procs}", objective, max_steps=4, grad_accum=accum,
                        lora={"dropout": 0.0}, eval_steps=None, strategy=strategy)
        assert medtune("data", str(cfg)).returncode == 0
        proc = medtune("train", str(cfg), "--gpus", str(procs))
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 0, err[-2000:]
        assert out.count("train: running") == 1 and out.count("research and education software") == 1, out
        curves[procs] = [loss for _, loss in losses(tmp_path / f"run{procs}")]
        report = json.loads((tmp_path / f"run{procs}" / "adapter" / "train_report.json").read_text())
        assert report["world_size"] == procs
        weights[procs] = report["weights_gib_per_process"]
    assert report["strategy"] == strategy
    if strategy == "fsdp":  # the base is split over the two processes (LoRA, a sliver, is whole on each)
        assert weights[2] < 0.6 * weights[1]
    else:
        assert weights[2] == weights[1]
    assert len(curves[1]) == 4
    assert curves[2] == pytest.approx(curves[1], rel=1e-5)


def test_sharded_and_compiled_matches_one_plain_process(tiny_config, tmp_path):
    """train.strategy fsdp with train.compile (each decoder layer compiled, FSDP's gathers between them): the
    losses of one uncompiled process at the same global batch, within compiled-code rounding."""
    curves = {}
    for procs, accum, compiled in ((1, 2, False), (2, 1, True)):
        cfg = configure(tiny_config, tmp_path / f"run{procs}", max_steps=3, grad_accum=accum, lora={"dropout": 0.0},
                        eval_steps=None, strategy="fsdp", compile=compiled)
        assert medtune("data", str(cfg)).returncode == 0
        proc = medtune("train", str(cfg), "--gpus", str(procs))
        _, err = proc.stdout, proc.stderr
        assert proc.returncode == 0, err[-2000:]
        curves[procs] = [loss for _, loss in losses(tmp_path / f"run{procs}")]
    assert len(curves[1]) == 3
    assert curves[2] == pytest.approx(curves[1], rel=1e-4)


def test_fsdp_refuses_what_it_cannot_shard(tiny_config, tmp_path):
    """QLoRA needs a GPU, DoRA whole weights: each is one line before anything is read."""
    for train, message in (({"qlora": True}, "train.qlora needs a CUDA GPU"),
                           ({"lora": {"dora": True}}, "train.lora.dora does not combine with train.strategy fsdp")):
        cfg = configure(tiny_config, tmp_path / f"run{len(message)}", max_steps=2, strategy="fsdp", **train)
        assert medtune("data", str(cfg)).returncode == 0
        proc = medtune("train", str(cfg), "--gpus", "2")
        _, err = proc.stdout, proc.stderr
        assert proc.returncode == 2 and message in err and "Traceback" not in err, err[-2000:]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_match_one_process_at_the_same_global_batch(tiny_config, tmp_path):
    """Two launchers, as on two hosts (--nnodes 2, one process each, torchrun's static rendezvous over
    127.0.0.1, gloo): the losses of one process with twice the accumulation."""
    curves = {}
    for name, accum in (("one", 2), ("two", 1)):
        cfg = configure(tiny_config, tmp_path / name, max_steps=4, grad_accum=accum, lora={"dropout": 0.0},
                        eval_steps=None)
        assert medtune("data", str(cfg)).returncode == 0
        if name == "one":
            procs = [medtune("train", str(cfg), timeout=600)]
        else:
            port = str(free_port())
            machines = [("train", str(cfg), "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                         "--master-port", port) for rank in (0, 1)]
            with ThreadPoolExecutor(2) as pool:  # both machines at once: each waits for the other to join
                procs = list(pool.map(lambda args: medtune(*args, timeout=600), machines))
        outputs = [(proc.stdout, proc.stderr) for proc in procs]
        for proc in procs:
            assert proc.returncode == 0, proc.stderr[-2000:]
        curves[name] = [loss for _, loss in losses(tmp_path / name)]
        report = json.loads((tmp_path / name / "adapter" / "train_report.json").read_text())
        assert report["world_size"] == (2 if name == "two" else 1)
    assert sum(out.count("train: running") for out, _ in outputs) == 1  # the first process talks
    assert len(curves["one"]) == 4
    assert curves["two"] == pytest.approx(curves["one"], rel=1e-5)


def test_node_options_are_checked_before_anything_starts(tiny_config, tmp_path):
    cfg = configure(tiny_config, tmp_path / "run")
    proc = medtune("train", str(cfg), "--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1")
    _, err = proc.stdout, proc.stderr
    assert proc.returncode == 2 and "--node-rank 2 must be below --nnodes 2" in err, err
    proc = medtune("train", str(cfg), "--nnodes", "2", "--node-rank", "1")
    _, err = proc.stdout, proc.stderr
    assert proc.returncode == 2 and "--nnodes above 1 needs --master-addr HOST" in err, err


def test_a_failing_process_of_a_multi_process_run_is_one_clear_error(tiny_config, tmp_path):
    """Both processes stop on a config this machine can't run; the launcher adds one line, no traceback."""
    cfg = configure(tiny_config, tmp_path / "run", max_steps=2, attention="flex_attention")
    assert medtune("data", str(cfg)).returncode == 0
    proc = medtune("train", str(cfg), "--gpus", "2")
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 2, err[-2000:]
    assert "train.attention flex_attention trains on a CUDA GPU only" in err
    assert "of 2 stopped (exit code 2)" in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_run_starts_at_ln2_and_records_its_metrics(tiny_config, tmp_path, objective):
    """DPO's first step: the policy is the reference (LoRA B = 0), loss ln 2, rewards and margins 0. Every step logs
    the preference metrics to metrics.jsonl and TensorBoard, and the plot has a panel for them."""
    cfg = load_config(configure(tiny_config, tmp_path / "run", objective, max_steps=4, eval_steps=None,
                                lora={"dropout": 0.0}))
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    report = run_stage(BY_NAME["train"], cfg, run, UI())
    metrics = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "nll"} | ({"log_odds_ratio", "log_odds"} if objective == "orpo" else set())
    assert all(keys <= m.keys() for m in steps)
    assert all(m["logps/chosen"] < 0 and m["nll"] > 0 for m in steps)
    if objective == "dpo":
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(steps[0]["rewards/margins"]) < 1e-4 and abs(steps[0]["rewards/chosen"]) < 1e-4
        assert steps[-1]["loss"] != steps[0]["loss"]
        assert len(list((run / "reference").glob("*/train.npy"))) == 1
    else:  # ORPO: the chosen reply's mean NLL minus lambda x log-sigmoid(log-odds)
        first = steps[0]
        assert first["loss"] == pytest.approx(first["nll"] - 0.1 * first["log_odds_ratio"], rel=1e-3)
    assert report["objective"] == objective and report["final_metrics"]["rewards/accuracies"] >= 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "adapter" / "tensorboard"))
    events.Reload()
    assert "train/rewards/margins" in events.Tags()["scalars"]


def test_objective_and_prepared_data_must_agree(tiny_config, tmp_path):
    cfg = load_config(configure(tiny_config, tmp_path / "run", max_steps=2))
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    cfg.train.objective = "dpo"
    with pytest.raises(MedtuneError, match="train.objective is dpo but .* holds conversations"):
        run_stage(BY_NAME["train"], cfg, run, UI())


def test_preference_dry_run(tiny_config, tmp_path):
    cfg = configure(tiny_config, tmp_path / "run", "dpo")
    assert medtune("data", str(cfg)).returncode == 0
    proc = medtune("train", str(cfg), "--dry-run")
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert re.search(r"objective +│ dpo ", out), out
    assert not (tmp_path / "run" / "reference").exists()  # timing needs no reference pass


def test_gradient_checkpointing_changes_memory_not_the_losses(tiny_config, tmp_path):
    curves = {}
    for flag in (False, True):
        cfg = load_config(configure(tiny_config, tmp_path / f"run{flag}", max_steps=3, eval_steps=None,
                                    lora={"dropout": 0.0}, gradient_checkpointing=flag))
        run = RunDir(cfg.run_dir)
        run_stage(BY_NAME["data"], cfg, run, UI())
        run_stage(BY_NAME["train"], cfg, run, UI())
        curves[flag] = [loss for _, loss in losses(cfg.run_dir)]
    assert len(curves[True]) == 3
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


def test_reference_cache_follows_a_rebuilt_starting_model(tiny_config, tmp_path):
    """A DPO run from an earlier run's merged/ must not reuse reference log-probabilities of the model it replaced."""
    from medtune.train.stage import reference_key

    merged = tmp_path / "merged"
    merged.mkdir()
    cfg = load_config(configure(tiny_config, tmp_path / "run", "dpo"), [f"base.model={merged}"])
    run = RunDir(cfg.run_dir)
    keys = []
    for build in ("first", "rebuilt", "rebuilt"):
        (merged / "manifest.json").write_text(json.dumps({"fingerprint": build}))
        keys.append(reference_key(cfg, run))
    assert keys[0] != keys[1] == keys[2]
