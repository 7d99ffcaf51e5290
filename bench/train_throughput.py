"""Training throughput on one GPU: medtune's fast path against the seed recipe, same workload, same card, one run.

Model: the exact Llama-3.2-1B config with random weights. Workload: synthetic ReasonMed-like conversations
(total length lognormal, median 700 tokens, sigma 0.6, clipped 160..4096 and cut at max length 2048; prompt 120-400
tokens; loss on the reply only). LoRA r8/alpha16/dropout 0.05 on q/k/v/o.

Reported per variant: real (non-padding) tokens/s after warm-up, peak GPU memory, and
MFU = tokens/s x 4 x N_params / (dense bf16 matmul FLOP/s measured in this run on this card).
The seed recipe (transformers Trainer + PEFT, fp16, micro-batch 4 x accumulation 4, padded to 512, Adafactor) runs
on the same workload in the same process. Correctness gates: a packed row gives each example the loss it has alone,
and the fast path's per-step loss stays within 1e-2 relative of a plain reference path (eager attention, no
compile, full logits) over 50 steps from the same init and data.

    python bench/train_throughput.py --out bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medtune.data.packing import efficiency, pack  # noqa: E402
from medtune.train.loss import IGNORE, CausalLMLoss  # noqa: E402
from medtune.train.stage import collate  # noqa: E402

MAX_LEN = 2048
EOT = 128009
PAD = 128004


def llama_1b_config(attn: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=PAD,
        attn_implementation=attn, torch_dtype="bfloat16",
    )


def workload(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    total = np.minimum(np.clip(rng.lognormal(np.log(700), 0.6, n), 160, 4096).astype(int), MAX_LEN)
    out = []
    for t in total:
        prompt = int(min(rng.integers(120, 401), t - 16))
        ids = rng.integers(0, 128000, t).astype(np.int32)
        ids[-1] = EOT
        mask = np.r_[np.zeros(prompt, np.uint8), np.ones(t - prompt, np.uint8)]
        out.append((ids, mask))
    return out


def build(attn: str, dropout: float = 0.05, dtype=torch.bfloat16, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_1b_config(attn), dtype=dtype).cuda()
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times)


def packed_batches(examples, rows_per_batch: int, seed: int = 0):
    lengths = [len(ids) for ids, _ in examples]
    rows = pack(lengths, MAX_LEN)
    order = np.random.default_rng(seed).permutation(len(rows))
    batches = [[[examples[i] for i in rows[j]] for j in order[k : k + rows_per_batch]]
               for k in range(0, len(order) - rows_per_batch + 1, rows_per_batch)]
    return batches, efficiency(lengths, rows, MAX_LEN)


def run_medtune(examples, attn: str, rows_per_batch: int, steps: int, warmup: int, compile_model: bool,
                dropout: float = 0.05, full_logits: bool = False, seed: int = 0) -> dict:
    """medtune's loop body: packed rows, bf16 base + fp32 LoRA, loss on labelled tokens, Adafactor."""
    from transformers.optimization import Adafactor

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(attn, dropout, seed=seed)
    if compile_model:  # the decoder has fixed (rows, 2048) shapes; the loss's data-dependent gather stays eager
        model.get_base_model().model.compile()  # in place, as the train stage does
    loss_model = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adafactor(params, lr=2e-4, scale_parameter=False, relative_step=False, warmup_init=False)
    batches, eff = packed_batches(examples, rows_per_batch, seed)
    losses, times, tokens = [], [], []
    for step in range(warmup + steps):
        batch = {k: v.cuda(non_blocking=True) for k, v in collate(batches[step % len(batches)], PAD).items()}
        torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if full_logits:
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                                         ignore_index=IGNORE, reduction="sum")
            else:
                loss = loss_model(batch["input_ids"], batch["position_ids"], batch["labels"])
        n = int((batch["labels"] != IGNORE).sum())
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - begin)
            tokens.append(int(batch["real_tokens"]))
        losses.append(float(loss) / n)
    result = {"tokens_per_s": sum(tokens) / sum(times), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
              "packing_efficiency": round(eff, 4), "losses": losses, "params": n_params(model)}
    del model, loss_model, opt
    return result


def run_seed_recipe(examples, steps: int, warmup: int, weights=torch.float32) -> dict:
    """transformers Trainer + PEFT, fp16 mixed precision, micro-batch 4 x accumulation 4, padded to 512, Adafactor.

    `weights`: the base's dtype as loaded (fp32, or fp16 as many notebooks load it; the LoRA weights stay fp32)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build("sdpa", dtype=weights)
    rows = []
    for ids, mask in examples:
        ids, mask = ids[:512], mask[:512]
        n = len(ids)
        input_ids = torch.full((512,), PAD, dtype=torch.long)
        input_ids[:n] = torch.from_numpy(ids.astype(np.int64))
        labels = torch.full((512,), IGNORE, dtype=torch.long)
        labels[:n] = torch.where(torch.from_numpy(mask.astype(bool)), input_ids[:n], IGNORE)
        attention = torch.zeros(512, dtype=torch.long)
        attention[:n] = 1
        rows.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention})

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.begin = 0.0

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.begin)

    timer = Timer()
    args = TrainingArguments(output_dir="/tmp/seed-recipe", per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=2e-4, warmup_steps=20, fp16=True,
                             optim="adafactor",
                             max_steps=warmup + steps, logging_steps=1000, save_strategy="no", report_to=[],
                             dataloader_drop_last=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
    trainer.train()
    real_per_step = np.mean([int(r["attention_mask"].sum()) for r in rows]) * 16
    step_time = statistics.median(timer.times[warmup:])
    result = {"tokens_per_s": real_per_step / step_time, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    del trainer, model
    return result


def packed_equals_alone(attn: str) -> float:
    """Max relative difference between each example's loss inside a packed row and alone."""
    model = build(attn, dropout=0.0)
    loss_model = CausalLMLoss(model).eval()
    rng = np.random.default_rng(7)
    examples = []
    for n in (300, 180, 250, 210, 320, 270):
        ids = rng.integers(0, 128000, n).astype(np.int32)
        examples.append((ids, np.r_[np.zeros(60, np.uint8), np.ones(n - 60, np.uint8)]))
    worst = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = collate([examples], PAD)
        packed = {k: v.cuda() for k, v in packed.items()}
        hidden = model.get_base_model().model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                              use_cache=False).last_hidden_state
        logits = model.get_base_model().lm_head(hidden).float()[0]
        per_token = torch.nn.functional.cross_entropy(logits, packed["labels"][0], ignore_index=IGNORE,
                                                      reduction="none")
        at = 0
        for ex in examples:
            n = len(ex[0])
            in_pack = per_token[at : at + n].sum()
            alone = collate([[ex]], PAD)
            alone = {k: v.cuda() for k, v in alone.items()}
            single = loss_model(alone["input_ids"], alone["position_ids"], alone["labels"])
            worst = max(worst, abs(float(in_pack) - float(single)) / abs(float(single)))
            at += n
    del model
    return worst


def correctness(examples, variant: str) -> dict:
    """The fast variant and a plain reference path, 50 steps from the same init on the same packed batches."""
    attn = "flex_attention" if variant.startswith("flex") else "sdpa"
    # Dropout off in both: compiled code draws its own random numbers, so masks would differ.
    fast = run_medtune(examples, attn, 2, 50, 0, "compile" in variant, dropout=0.0)
    reference = run_medtune(examples, "eager", 2, 50, 0, False, dropout=0.0, full_logits=True)
    rel = [abs(a - b) / abs(b) for a, b in zip(fast["losses"], reference["losses"])]
    return {"fast": variant, "reference": "eager attention, no compile, full logits, bf16", "steps": 50,
            "max_rel_diff": max(rel), "mean_rel_diff": statistics.mean(rel),
            "first_losses": [round(x, 4) for x in fast["losses"][:3]], "last_losses": [
                round(fast["losses"][-1], 4), round(reference["losses"][-1], 4)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4, help="packed rows of 2048 tokens per micro-batch")
    parser.add_argument("--variants", default="sdpa,flex,flex+compile,flex+compile+nodropout,flex+compile@8")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    parser.add_argument("--correctness-only", metavar="VARIANT", help="only the 50-step gate of this variant")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    card = torch.cuda.get_device_name()
    examples = workload(6000)
    if args.correctness_only:
        gate = correctness(examples, args.correctness_only)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
                                        "command": " ".join(["python", *sys.argv]), "correctness": gate}, indent=2))
        print(json.dumps(gate, indent=2))
        return
    flops = matmul_flops()
    print(f"card {card}; bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    results: dict = {"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
                     "command": " ".join(["python", *sys.argv]), "matmul_tflops": round(flops / 1e12, 1)}
    import transformers

    results["transformers"] = transformers.__version__

    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["packed_vs_alone_max_rel_diff"] = {a: packed_equals_alone(a) for a in ("sdpa", "flex_attention")}
    print("packed vs alone:", results["packed_vs_alone_max_rel_diff"], flush=True)

    # 16 micro-batches a step: fewer steps. The faster of the two ways to load the base is the baseline.
    baselines = {name: run_seed_recipe(examples, max(args.steps // 2, 5), 3, dtype)
                 for name, dtype in (("fp32 weights", torch.float32), ("fp16 weights", torch.float16))}
    for name, r in baselines.items():
        print(f"seed recipe, {name}: {r['tokens_per_s']:,.0f} tok/s, {r['peak_mem_gib']:.1f} GiB", flush=True)
    results["baselines"] = baselines
    seed = max(baselines.values(), key=lambda r: r["tokens_per_s"])
    results["baseline"] = seed

    variants = {}
    for name in args.variants.split(","):
        attn = "flex_attention" if name.startswith("flex") else "sdpa"
        rows = int(name.split("@")[1]) if "@" in name else args.rows
        try:
            r = run_medtune(examples, attn, rows, args.steps, args.warmup, "compile" in name,
                            dropout=0.0 if "nodropout" in name else 0.05)
        except Exception as exc:  # a failing variant is recorded, the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: FAILED {variants[name]['error']}", flush=True)
            continue
        r["rows_per_batch"] = rows
        r["mfu"] = r["tokens_per_s"] * 4 * r["params"] / flops
        r["ratio_vs_seed"] = r["tokens_per_s"] / seed["tokens_per_s"]
        r.pop("losses")
        variants[name] = r
        results["variants"] = variants
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # what ran survives a timeout
        print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, {r['peak_mem_gib']:.1f} GiB, "
              f"x{r['ratio_vs_seed']:.2f}", flush=True)
    results["variants"] = variants

    ok = {k: v for k, v in variants.items() if "error" not in v}
    best_name = max(ok, key=lambda k: ok[k]["tokens_per_s"])
    results["correctness"] = correctness(examples, best_name)
    rel_max = results["correctness"]["max_rel_diff"]
    best = ok[best_name]
    results |= {"best_variant": best_name, "tokens_per_s": best["tokens_per_s"],
                "baseline_tokens_per_s": seed["tokens_per_s"], "ratio": best["tokens_per_s"] / seed["tokens_per_s"],
                "mfu": best["mfu"], "peak_mem_gib": best["peak_mem_gib"], "loss_rel_diff": rel_max}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| variant | tokens/s | MFU | peak GiB | x seed |\n|---|---:|---:|---:|---:|\n"
          f"| seed recipe | {seed['tokens_per_s']:,.0f} | {seed['tokens_per_s'] * 4 * best['params'] / flops:.1%} "
          f"| {seed['peak_mem_gib']:.1f} | 1.00 |")
    for name, r in ok.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | "
              f"{r['ratio_vs_seed']:.2f} |")
    print(f"loss rel diff fast vs reference over 50 steps: max {rel_max:.2e}")
    if not math.isfinite(rel_max):
        sys.exit(1)


if __name__ == "__main__":
    main()
