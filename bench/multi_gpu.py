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
import subprocess
import sys
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    parser.add_argument("--runs", default="1,2,fsdp", help="which runs: 1 (one GPU), 2 (two, ddp), fsdp (two)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from data_throughput import synthetic_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(args.tokenizer, tmp / "model")
        synthetic_file(tmp / "data.jsonl", 3000)
        runs = {}
        for name, gpus, accum, strategy in (("1", 1, 2, "ddp"), ("2", 2, 1, "ddp"), ("fsdp", 2, 1, "fsdp")):
            if name not in args.runs.split(","):
                continue
            cfg = {
                "name": f"multi-gpu-{name}", "run_dir": str(tmp / f"run{name}"), "seed": 0,
                "base": {"model": str(tmp / "model")},
                "data": {"path": str(tmp / "data.jsonl"), "max_len": 2048, "packing": True, "val_fraction": 0.01,
                         "contamination": "ignore"},
                "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": accum, "lr": 2e-4, "warmup_steps": 5,
                          "precision": "bf16", "checkpoint_steps": 1000, "tensorboard": False,
                          "attention": "flex_attention", "compile": strategy == "ddp", "strategy": strategy},
                "export": {"name": "x"},
            }
            path = tmp / f"cfg{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                       NVSHMEM_DISABLE_NVLS="1")
            if gpus == 1:
                env["CUDA_VISIBLE_DEVICES"] = "0"
            cli = [sys.executable, "-m", "medtune.cli"]
            subprocess.run([*cli, "data", str(path)], check=True, env=env, cwd=ROOT)
            train = subprocess.run([*cli, "train", str(path), "--gpus", str(gpus)], env=env, cwd=ROOT,
                                   stderr=subprocess.PIPE, text=True)
            if train.returncode != 0:  # recorded; the other runs still go
                runs[name] = {"error": train.stderr[-1500:]}
                print(name, "FAILED", train.stderr[-3000:], flush=True)
                continue
            adapter = tmp / f"run{name}" / "adapter"
            metrics = [json.loads(line) for line in (adapter / "metrics.jsonl").open()]
            report = json.loads((adapter / "train_report.json").read_text())
            runs[name] = {"losses": [m["loss"] for m in metrics if "loss" in m],
                          "tokens_per_s": steady_tokens_per_s(metrics), "peak_gpu_memory_gib":
                          report["peak_gpu_memory_gib"], "weights_gib_per_process": report["weights_gib_per_process"]}
            print(name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)

    def rel(other: str) -> list[float]:  # relative to the one-GPU run
        return [abs(a - b) / abs(a) for a, b in zip(runs["1"]["losses"], runs[other]["losses"])]

    result = {
        "card": torch.cuda.get_device_name(), "date": date.today().isoformat(), "gpus": 2,
        "command": " ".join(["python", *sys.argv]), "steps": STEPS, "steady_from_step": STEADY_FROM,
        "global_batch_rows": 8, "max_len": 2048,
        "settings": "flex_attention, compiled decoder, bf16, packed 4 x 2048 rows per GPU micro-batch",
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
