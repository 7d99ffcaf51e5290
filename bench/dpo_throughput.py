"""DPO throughput on one GPU: medtune's preference objective against TRL's DPOTrainer (+ PEFT), same pairs, same
card, one run.

Model: the Llama-3.2-1B config with random weights (bench/common.py), LoRA r8/alpha16 on q/k/v/o, dropout 0
in both (so the two can be compared step by step). Pairs: synthetic texts, prompt 120-400 tokens, chosen and rejected
replies lognormal (median 400 tokens, sigma 0.5, 16..1500), tokenized once by TRL with the Llama-3.2 tokenizer;
medtune trains on exactly TRL's token ids (prompt + reply, loss mask on the reply and its end token).

Both: the same initial weights (TRL's LoRA initialisation copied into medtune's model), the same pairs in the same
order (TRL's sampler made sequential), AdamW at a constant learning rate, clipping at 1.0, bf16, sigmoid DPO with
beta 0.1. TRL runs as its defaults have it with a PEFT model: the reference is the model with the adapter disabled,
run at every step. medtune computes the reference log-probabilities once before training (not timed: reported) and
packs all the pairs of a micro-batch into one row (variable-length attention), the head giving per-token
log-probabilities without the vocabulary's logits for the batch.

Reported: pairs/s and real (chosen + rejected) tokens/s after warm-up, peak GPU memory, MFU = tokens/s x 4 x
N_params / measured bf16 matmul FLOP/s (forward + input-gradient backward of a frozen base), and the per-step losses
of both over every step with their largest relative difference.

    python bench/dpo_throughput.py --tokenizer .bench_assets/llama32-tokenizer --out bench/results/dpo_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_setup, llama_1b_config, matmul_flops, n_params  # noqa: E402

from medtune.config import PreferenceConfig  # noqa: E402
from medtune.train import engine  # noqa: E402
from medtune.train.loss import CausalLMLoss  # noqa: E402
from medtune.train.objectives.preference import Preference, reference_logps  # noqa: E402

BETA = 0.1
LR = 5e-5
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def synthetic_pairs(tokenizer, n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)

    def text(length: int) -> str:
        return tokenizer.decode(rng.integers(1000, 100_000, length).tolist())

    def reply() -> int:
        return int(np.clip(rng.lognormal(np.log(400), 0.5), 16, 1500))

    return [{"prompt": text(int(rng.integers(120, 401))), "chosen": text(reply()), "rejected": text(reply())}
            for _ in range(n)]


def base_model(attn: str, state: dict | None = None, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_1b_config(attn), dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    model.config.use_cache = False
    return model.cuda()


class StepTimer:
    """A transformers callback: wall time of every optimizer step (the GPU synchronised at each end)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_step_begin(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                self.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.begin)

        return _Timer()


def run_trl(pairs: list[dict], tokenizer, batch: int, steps: int, warmup: int, out_dir: Path,
            checkpointing: bool, fp32: bool = False) -> dict:
    """TRL's DPOTrainer with a PEFT LoRA, sequential order; returns its timing, losses, tokenized pairs, LoRA init."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model_state_dict
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class SequentialDPO(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = base_model("sdpa", dtype=torch.float32 if fp32 else torch.bfloat16)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    config = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                       learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_steps=warmup + steps,
                       logging_steps=1, report_to=[], bf16=not fp32, beta=BETA, loss_type=["sigmoid"], max_length=None,
                       max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0, save_strategy="no",
                       dataloader_num_workers=0, seed=0, gradient_checkpointing=checkpointing)
    timer = StepTimer()
    trainer = SequentialDPO(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                            processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
                            callbacks=[timer])
    lora_init = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    tokenized = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                 for i in range(batch * (warmup + steps))]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = sum(timer.times[warmup:])
    tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"])
                 for p in tokenized[batch * warmup:])
    result = {"pairs_per_s": batch * steps / timed, "tokens_per_s": tokens / timed,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses}
    del trainer, model
    torch.cuda.empty_cache()
    return result | {"state": state, "lora_init": lora_init, "tokenized": tokenized}


def as_pairs(tokenized: list[dict], eos_id: int) -> list:
    """TRL's token ids as medtune pairs: (prompt + reply) with the loss mask on the reply (which ends in EOS)."""
    out = []
    for p in tokenized:
        prompt = np.asarray(p["prompt_ids"], np.int32)
        sides = []
        for key in ("chosen_ids", "rejected_ids"):
            reply = np.asarray(p[key], np.int32)
            sides.append((np.r_[prompt, reply], np.r_[np.zeros(len(prompt), np.uint8), np.ones(len(reply), np.uint8)]))
        out.append((sides[0], sides[1], None))
    return out


def run_medtune(pairs: list, state: dict, lora_init: dict, attn: str, compile_model: bool, batch: int, steps: int,
                warmup: int, pad_id: int, fp32: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.cuda.empty_cache()
    model = get_peft_model(base_model(attn, state, torch.float32 if fp32 else torch.bfloat16),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    set_peft_model_state_dict(model, {k: v.cuda() for k, v in lora_init.items()})
    if compile_model:
        model.get_base_model().model.compile()
    loss_model = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    setup = bench_setup(model, loss_model, optimizer, warmup + steps, "fp32" if fp32 else "bf16")
    objective = Preference("dpo", PreferenceConfig(beta=BETA), pad_id, flat=attn in ("varlen", "flex_attention"))
    autocast = setup.autocast

    begin = time.perf_counter()
    reference = reference_logps(objective, loss_model, model, pairs, batch, torch.device("cuda"), autocast)
    torch.cuda.synchronize()
    reference_s = time.perf_counter() - begin
    pairs = objective.with_reference(pairs, reference)
    torch.cuda.reset_peak_memory_stats()
    losses, tokens, timed = [], 0, 0.0
    for step in range(warmup + steps):
        micro = pairs[step * batch : (step + 1) * batch]
        torch.cuda.synchronize()
        begin = time.perf_counter()
        n_tokens, units = objective.counts(micro)
        loss, _ = engine.backward_step(setup, objective, [objective.collate(micro)], units)
        engine.optimizer_step(setup, 1.0)
        losses.append(loss / units)
        torch.cuda.synchronize()
        if step >= warmup:
            timed += time.perf_counter() - begin
            tokens += n_tokens
    result = {"pairs_per_s": batch * steps / timed, "tokens_per_s": tokens / timed,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": [float(x) for x in losses],
              "reference_s": round(reference_s, 2), "params": n_params(model)}
    del model, loss_model, setup, optimizer
    torch.cuda.empty_cache()
    return result


def learning_equality(texts: list[dict], tokenizer, batch: int, steps: int) -> dict:
    """The same learning, without bf16's noise: TRL and medtune in fp32 (SDPA attention, one row per pair on
    medtune's side), same init, pairs, order and hyperparameters; every step's loss compared."""
    trl_run = run_trl(texts, tokenizer, batch, steps, 0, Path("/tmp/trl-dpo-fp32"), checkpointing=False, fp32=True)
    state, lora_init, tokenized = trl_run.pop("state"), trl_run.pop("lora_init"), trl_run.pop("tokenized")
    ours = run_medtune(as_pairs(tokenized, tokenizer.eos_token_id), state, lora_init, "sdpa", False, batch, steps, 0,
                       tokenizer.pad_token_id, fp32=True)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], trl_run["losses"])]
    return {"precision": "fp32", "pairs_per_step": batch, "steps_compared": len(rel), "max_rel_diff": max(rel),
            "trl_losses": trl_run["losses"], "medtune_losses": ours["losses"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Llama-3.2 tokenizer folder")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="varlen+compile,varlen")
    parser.add_argument("--equality-only", action="store_true", help="only the fp32 step-by-step loss comparison")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dpo_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from medtune.train.attention import register

    register()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    card = torch.cuda.get_device_name()
    flops = matmul_flops()
    print(f"card {card}; bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    import transformers
    import trl

    results: dict = {"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "command": " ".join(["python", *sys.argv]), "matmul_tflops": round(flops / 1e12, 1),
                     "pairs_per_step": args.batch, "steps_timed": args.steps, "warmup_steps": args.warmup}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    texts = synthetic_pairs(tokenizer, args.batch * (args.warmup + args.steps))
    if args.equality_only:
        results["learning_equality"] = learning_equality(texts[: 4 * args.steps], tokenizer, 4, args.steps)
        save()
        print(json.dumps({k: v for k, v in results["learning_equality"].items() if "losses" not in k}), flush=True)
        return
    baselines = {}
    for name, checkpointing in (("TRL defaults (gradient checkpointing)", True), ("TRL, no checkpointing", False)):
        run = run_trl(texts, tokenizer, args.batch, args.steps, args.warmup, Path("/tmp/trl-dpo"), checkpointing)
        state, lora_init, tokenized = run.pop("state"), run.pop("lora_init"), run.pop("tokenized")
        baselines[name] = run
        print(f"{name}: {run['pairs_per_s']:.2f} pairs/s, {run['tokens_per_s']:,.0f} tok/s, "
              f"{run['peak_mem_gib']:.1f} GiB", flush=True)
    results["baselines"] = baselines
    # the faster TRL is the baseline of the speed ratio; memory is compared with both
    trl_name = max(baselines, key=lambda k: baselines[k]["pairs_per_s"])
    trl_run = baselines[trl_name]
    results["baseline"] = trl_name + "; reference = the adapter disabled, run at every step"
    save()
    pairs = as_pairs(tokenized, tokenizer.eos_token_id)
    lengths = [len(c[0]) + len(r[0]) for c, r, _ in pairs]
    results["tokens_per_pair"] = {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))}

    variants: dict = {}
    results["variants"] = variants
    for name in args.variants.split(","):
        parts = name.split("+")
        attn = {"sdpa": "sdpa", "flex": "flex_attention", "varlen": "varlen"}[parts[0]]
        try:
            r = run_medtune(pairs, state, lora_init, attn, "compile" in parts, args.batch, args.steps, args.warmup,
                            tokenizer.pad_token_id)
        except Exception as exc:  # a failing variant is recorded, the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: FAILED {variants[name]['error']}", flush=True)
            torch.cuda.empty_cache()
            continue
        r["mfu"] = r["tokens_per_s"] * 4 * r["params"] / flops
        r["ratio_vs_trl"] = r["pairs_per_s"] / trl_run["pairs_per_s"]
        n = min(len(r["losses"]), len(trl_run["losses"]))
        r["loss_rel_diff_vs_trl"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], trl_run["losses"][:n]))
        variants[name] = r
        save()
        print(f"{name}: {r['pairs_per_s']:.2f} pairs/s ({r['tokens_per_s']:,.0f} tok/s), MFU {r['mfu']:.1%}, "
              f"{r['peak_mem_gib']:.1f} GiB, x{r['ratio_vs_trl']:.2f} TRL, loss rel diff "
              f"{r['loss_rel_diff_vs_trl']:.2e}", flush=True)

    ok = {k: v for k, v in variants.items() if "error" not in v}
    if not ok:
        sys.exit(1)
    best_name = max(ok, key=lambda k: ok[k]["pairs_per_s"])
    best = ok[best_name]
    results |= {"best_variant": best_name, "pairs_per_s": best["pairs_per_s"],
                "baseline_pairs_per_s": trl_run["pairs_per_s"], "ratio": best["ratio_vs_trl"], "mfu": best["mfu"],
                "peak_mem_gib": best["peak_mem_gib"], "baseline_peak_mem_gib": trl_run["peak_mem_gib"],
                "baseline_min_peak_mem_gib": min(b["peak_mem_gib"] for b in baselines.values()),
                "loss_rel_diff_vs_baseline": best["loss_rel_diff_vs_trl"],
                "steps_compared": min(len(best["losses"]), len(trl_run["losses"]))}
    save()
    print("\n| run | pairs/s | tokens/s | MFU | peak GiB | x TRL | loss rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in baselines.items():
        print(f"| {name} | {b['pairs_per_s']:.2f} | {b['tokens_per_s']:,.0f} | "
              f"{b['tokens_per_s'] * 4 * best['params'] / flops:.1%} | {b['peak_mem_gib']:.1f} | "
              f"{b['pairs_per_s'] / trl_run['pairs_per_s']:.2f} | - |")
    for name, r in ok.items():
        print(f"| {name} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{r['peak_mem_gib']:.1f} | {r['ratio_vs_trl']:.2f} | {r['loss_rel_diff_vs_trl']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
