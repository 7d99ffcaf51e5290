"""`medtune train --gpus 2` against one GPU at the same global batch: loss curves and scaling efficiency.

Builds a random-weight Llama-3.2-1B-shaped model (with the SmolLM2 tokenizer, so vocab 49152, from
--tokenizer DIR) and a synthetic ReasonMed-like data set, prepares it with packing at max length 2048, then runs
the real CLI with the fast config's settings (flex attention, compiled decoder): 1 GPU with gradient accumulation
2, and 2 GPUs with accumulation 1 (global batch 2 x 4 packed rows either way). Efficiency = steady tokens/s on 2
GPUs / (2 x tokens/s on 1). A third run shards the base over the 2 GPUs (strategy fsdp, not compiled): same
losses, half the weights per GPU. Writes JSON with `gpus`, `tokens_per_s_1`, `tokens_per_s_2`, `efficiency`,
`loss_max_rel_diff`, and `fsdp`.

    python bench/multi_gpu.py --tokenizer DIR --out bench/results/multi_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS, STEADY_FROM = 30, 10


def make_model(tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def steady_tokens_per_s(metrics: list[dict]) -> float:
    rows = {m["step"]: m for m in metrics if "loss" in m}
    a, b = rows[STEADY_FROM], rows[STEPS]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


# Put on PYTHONPATH for the bench's runs only: SIGUSR1 makes any Python process print every thread's stack, so a
# run that makes no progress shows where each process is (compiling, or waiting in a collective).
STACK_DUMPS = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def python_descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [root], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                if "python" in os.readlink(f"/proc/{child}/exe"):
                    found.append(child)
            except OSError:
                pass
    return found


def watched(cmd: list[str], env: dict, timeout: float, dump_at: list[float], name: str) -> tuple[int, str]:
    """Run `cmd`, echoing its stderr with timestamps; dump every Python stack at `dump_at` seconds; kill the
    whole process group after `timeout` s. Returns the exit code (-1: timed out) and the stderr's tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line)
            del tail[:-200]
            print(f"[{name} {time.perf_counter() - start:6.1f}s] {line.rstrip()[:300]}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    pending = sorted(dump_at)
    code = None
    while code is None:
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            elapsed = time.perf_counter() - start
            if pending and elapsed >= pending[0]:
                pending.pop(0)
                pids = python_descendants(proc.pid)
                print(f"[{name} {elapsed:6.1f}s] no exit yet: stacks of {pids}", flush=True)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
            if elapsed >= timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                reader.join(timeout=5)
                return -1, f"timed out after {timeout:.0f} s\n" + "".join(tail[-40:])
    reader.join(timeout=5)
    return code, "".join(tail[-40:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    parser.add_argument("--runs", default="1,2,fsdp", help="which runs, in this order: 1 (one GPU), 2 (two, ddp), "
                        "fsdp (two)")
    parser.add_argument("--no-compile", action="store_true", help="ddp runs without train.compile")
    parser.add_argument("--reference", type=Path, help="an earlier result whose one-GPU losses the runs are compared "
                        "with, when this call does not run 1")
    parser.add_argument("--timeouts", default="400,300,240", help="seconds each run may take, in --runs order")
    args = parser.parse_args()
    timeouts = dict(zip(args.runs.split(","), map(float, args.timeouts.split(","))))
    import torch
    from common import synthetic_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(args.tokenizer, tmp / "model")
        synthetic_file(tmp / "data.jsonl", 3000)
        (tmp / "hooks").mkdir()
        (tmp / "hooks" / "sitecustomize.py").write_text(STACK_DUMPS)
        runs = {}
        setups = {"1": (1, 2, "ddp"), "2": (2, 1, "ddp"), "fsdp": (2, 1, "fsdp")}
        for name in args.runs.split(","):
            gpus, accum, strategy = setups[name]
            cfg = {
                "name": f"multi-gpu-{name}", "run_dir": str(tmp / f"run{name}"), "seed": 0,
                "base": {"model": str(tmp / "model")},
                "data": {"path": str(tmp / "data.jsonl"), "max_len": 2048, "packing": True, "val_fraction": 0.01,
                         "contamination": "ignore"},
                "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": accum, "lr": 2e-4, "warmup_steps": 5,
                          "precision": "bf16", "checkpoint_steps": 1000, "tensorboard": False,
                          "attention": "flex_attention", "compile": strategy == "ddp" and not args.no_compile,
                          "strategy": strategy},
                "export": {"name": "x"},
            }
            path = tmp / f"cfg{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                       NVSHMEM_DISABLE_NVLS="1", PYTHONUNBUFFERED="1",
                       PYTHONPATH=os.pathsep.join([str(tmp / "hooks"), *filter(None, [os.environ.get("PYTHONPATH")])]))
            if gpus == 1:
                env["CUDA_VISIBLE_DEVICES"] = "0"
            cli = [sys.executable, "-m", "medtune.cli"]
            subprocess.run([*cli, "data", str(path)], check=True, env=env, cwd=ROOT)
            limit = timeouts.get(name, 400.0)
            code, err = watched([*cli, "train", str(path), "--gpus", str(gpus)], env, limit,
                                [limit * 0.45, limit - 15], name)
            if code != 0:  # recorded; the other runs still go
                runs[name] = {"error": err[-1500:]}
                print(name, "FAILED", flush=True)
                continue
            adapter = tmp / f"run{name}" / "adapter"
            metrics = [json.loads(line) for line in (adapter / "metrics.jsonl").open()]
            report = json.loads((adapter / "train_report.json").read_text())
            runs[name] = {"losses": [m["loss"] for m in metrics if "loss" in m],
                          "tokens_per_s": steady_tokens_per_s(metrics), "peak_gpu_memory_gib":
                          report["peak_gpu_memory_gib"], "weights_gib_per_process": report["weights_gib_per_process"]}
            print(name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)

    if "1" not in runs and args.reference:
        runs["1"] = {"losses": json.loads(args.reference.read_text())["losses_1"], "from": str(args.reference)}

    def rel(other: str) -> list[float]:  # relative to the one-GPU run
        return [abs(a - b) / abs(a) for a, b in zip(runs["1"]["losses"], runs[other]["losses"])]

    result = {
        "card": torch.cuda.get_device_name(), "date": date.today().isoformat(), "gpus": 2,
        "command": " ".join(["python", *sys.argv]), "steps": STEPS, "steady_from_step": STEADY_FROM,
        "global_batch_rows": 8, "max_len": 2048,
        "settings": f"flex_attention, {'eager' if args.no_compile else 'compiled'} decoder, bf16, packed 4 x 2048 "
                    "rows per GPU micro-batch",
        "runs": {name: {k: v for k, v in run.items() if k != "losses"} for name, run in runs.items()},
    }
    ok = {name for name, run in runs.items() if "error" not in run}
    if {"1", "2"} <= ok:
        result |= {
            "tokens_per_s_1": runs["1"]["tokens_per_s"], "tokens_per_s_2": runs["2"]["tokens_per_s"],
            "efficiency": runs["2"]["tokens_per_s"] / (2 * runs["1"]["tokens_per_s"]),
            "loss_max_rel_diff": max(rel("2")), "loss_mean_rel_diff": sum(rel("2")) / len(rel("2")),
            "losses_1": runs["1"]["losses"], "losses_2": runs["2"]["losses"],
        }
    if {"1", "fsdp"} <= ok:
        result["fsdp"] = {"settings": "strategy fsdp (FSDP2, base sharded over 2 GPUs), flex_attention, not compiled",
                          "loss_max_rel_diff": max(rel("fsdp")), "losses": runs["fsdp"]["losses"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses") and k != "fsdp"}, indent=2))
    if "fsdp" in result:
        print("fsdp: loss max rel diff vs 1 GPU", result["fsdp"]["loss_max_rel_diff"])
    if ok != set(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
