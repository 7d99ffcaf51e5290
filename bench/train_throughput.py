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

from common import (  # noqa: E402
    MAX_LEN,
    PAD,
    bench_setup,
    llama_1b_config,
    matmul_flops,
    n_params,
    packed_batches,
    workload,
)

from medtune.train import engine  # noqa: E402
from medtune.train.loss import IGNORE, CausalLMLoss  # noqa: E402
from medtune.train.objectives.sft import LOSS_INPUTS, SFT, collate  # noqa: E402


def build(attn: str, dropout: float = 0.05, dtype=torch.bfloat16, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_1b_config(attn), dtype=dtype).cuda()
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class LigerLoss(CausalLMLoss):
    """The same loss with Liger's fused linear cross-entropy as the head (GPU, liger-kernel installed)."""

    def head_loss(self, head, hidden, targets):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, head.weight, targets, reduction="sum", chunk_mem_const=16)


def parse_variant(name: str) -> dict:
    """'flex+compile+nodropout@8' -> options. Parts: sdpa|flex|varlen, compile, nodropout, liger (head),
    chunkedce (head recomputed in backward), hfopt (transformers' Adafactor), sync (host waits every step)."""
    base, _, rows = name.partition("@")
    parts = base.split("+")
    attn = {"sdpa": "sdpa", "flex": "flex_attention", "varlen": "varlen", "eager": "eager"}[parts[0]]
    return {"attn": attn, "rows": int(rows) if rows else None, "compile_model": "compile" in parts,
            "dropout": 0.0 if "nodropout" in parts else 0.05,
            "head": "liger" if "liger" in parts else "chunked" if "chunkedce" in parts else "fused",
            "optimizer": "hf" if "hfopt" in parts else "batched", "sync_each_step": "sync" in parts}


def run_medtune(examples, attn: str, rows_per_batch: int, steps: int, warmup: int, compile_model: bool,
                dropout: float = 0.05, full_logits: bool = False, seed: int = 0, head: str = "fused",
                optimizer: str = "batched", sync_each_step: bool = False, profile: Path | None = None) -> dict:
    """medtune's training step (train/engine.py, SFT objective): packed rows, bf16 base + fp32 LoRA, loss on labelled
    tokens, Adafactor. `full_logits`: the plain reference path instead (full logits, cross-entropy in PyTorch).

    Timed as the train stage runs: the host does not wait for the GPU inside a step (unless `sync_each_step`);
    wall time over the timed steps, one synchronisation at each end."""
    from transformers.optimization import Adafactor as HFAdafactor

    from medtune.train.optim import Adafactor

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(attn, dropout, seed=seed)
    if compile_model:  # the decoder has fixed (rows, 2048) shapes; the loss's data-dependent gather stays eager
        model.get_base_model().model.compile()  # in place, as the train stage does
    loss_model = (LigerLoss if head == "liger" else CausalLMLoss)(model, fused_head=head == "fused")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = HFAdafactor(params, lr=2e-4, scale_parameter=False, relative_step=False, warmup_init=False) \
        if optimizer == "hf" else Adafactor(params, lr=2e-4)
    batches, eff = packed_batches(examples, rows_per_batch, seed)
    setup = bench_setup(model, loss_model, opt, warmup + steps)
    objective = SFT(PAD, MAX_LEN)
    losses = []

    def one_step(step: int) -> int:
        rows = batches[step % len(batches)]
        tokens, n = objective.counts(rows)
        if full_logits:
            batch = collate(rows, PAD, MAX_LEN)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                               use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                         batch["labels"].cuda().flatten(), ignore_index=IGNORE,
                                                         reduction="sum")
            (loss / n).backward()
            loss = loss.detach()
        else:
            loss, _ = engine.backward_step(setup, objective, [objective.collate(rows)], n)
        engine.optimizer_step(setup, 1.0)
        losses.append(loss / n)
        if sync_each_step:
            float(losses[-1])
        return tokens

    for step in range(warmup):
        one_step(step)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    tokens = sum(one_step(step) for step in range(warmup, warmup + steps))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    if profile is not None:  # after the timed steps, so the profiler's own cost is not in the number
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for step in range(warmup + steps, warmup + steps + 3):
                one_step(step)
            torch.cuda.synchronize()
        summarize_profile(prof, profile)
        del losses[warmup + steps:]
    result = {"tokens_per_s": tokens / elapsed, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
              "packing_efficiency": round(eff, 4), "losses": [float(x) for x in losses], "params": n_params(model)}
    return result  # the model, optimizer and step closure go with this frame


def summarize_profile(prof, out: Path) -> None:
    """Kernel time by kind over the profiled steps, and the top kernels; printed and written to `out`."""
    kinds = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk"), "attention": ("flex", "attn", "fmha",
             "flash"), "triton (fused)": ("triton",), "memcpy/memset": ("memcpy", "memset", "copy")}
    totals: dict[str, float] = {}
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "self_device_time_total", 0) or 0
        if cuda_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.key.lower()
        kind = next((k for k, keys in kinds.items() if any(x in name for x in keys)), "other")
        totals[kind] = totals.get(kind, 0) + cuda_us
        rows.append((cuda_us, evt.count, evt.key[:110]))
    total = sum(totals.values())
    lines = ["kernel time by kind (3 steps):"] + [f"  {k:16s} {v / 1e3:9.1f} ms {v / total:6.1%}"
                                                   for k, v in sorted(totals.items(), key=lambda x: -x[1])]
    lines += ["top kernels:"] + [f"  {us / 1e3:8.2f} ms x{c:<5d} {name}" for us, c, name in sorted(rows)[::-1][:30]]
    text = "\n".join(lines)
    print(text, flush=True)
    out.write_text(text + "\n")


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
    """Max relative difference between each example's loss inside a packed row and alone (same loss path)."""
    model = build(attn, dropout=0.0)
    loss_model = CausalLMLoss(model).eval()
    rng = np.random.default_rng(7)
    examples = []
    for n in (300, 180, 250, 210, 320, 270):
        ids = rng.integers(0, 128000, n).astype(np.int32)
        examples.append((ids, np.r_[np.zeros(60, np.uint8), np.ones(n - 60, np.uint8)]))
    worst = 0.0
    cuda = torch.device("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = {k: v.to(cuda) for k, v in collate([examples], PAD).items()}
        at = 0
        for ex in examples:
            n = len(ex[0])
            mine = (packed["label_index"] >= at) & (packed["label_index"] < at + n)
            in_pack = loss_model(packed["input_ids"], packed["position_ids"], packed["label_index"][mine],
                                 packed["targets"][mine], packed["cu_seq_lens"])
            alone = collate([[ex]], PAD)
            single = loss_model(*(alone[k].to(cuda) for k in LOSS_INPUTS))
            worst = max(worst, abs(float(in_pack) - float(single)) / abs(float(single)))
            at += n
    del model
    return worst


def correctness(examples, variant: str) -> dict:
    """The fast variant and a plain reference path, 50 steps from the same init on the same packed batches."""
    opts = parse_variant(variant)
    opts.pop("rows")
    opts["dropout"] = 0.0  # in both: compiled code draws its own random numbers, so masks would differ
    fast = run_medtune(examples, rows_per_batch=2, steps=50, warmup=0, **opts)
    reference = run_medtune(examples, "eager", 2, 50, 0, False, dropout=0.0, full_logits=True, optimizer="hf")
    rel = [abs(a - b) / abs(b) for a, b in zip(fast["losses"], reference["losses"])]
    return {"fast": variant, "reference": "eager attention, no compile, full logits, transformers' Adafactor, bf16",
            "steps": 50, "max_rel_diff": max(rel), "mean_rel_diff": statistics.mean(rel),
            "first_losses": [round(x, 4) for x in fast["losses"][:3]], "last_losses": [
                round(fast["losses"][-1], 4), round(reference["losses"][-1], 4)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4, help="packed rows of 2048 tokens per micro-batch")
    parser.add_argument("--variants", default="flex+compile,varlen+compile,flex+compile+chunkedce+hfopt+sync")
    parser.add_argument("--gates", default="flex_attention,varlen", help="attentions checked packed vs alone")
    parser.add_argument("--no-baseline", action="store_true", help="skip the seed recipe (exploration runs)")
    parser.add_argument("--no-correctness", action="store_true", help="skip the 50-step gate (exploration runs)")
    parser.add_argument("--profile", metavar="VARIANT", help="profile 3 steps of this variant (kernel table)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    parser.add_argument("--correctness-only", metavar="VARIANT", help="only the 50-step gate of this variant")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from medtune.train.attention import register

    register()  # the `varlen` attention implementation

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
    import transformers

    results: dict = {"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "command": " ".join(["python", *sys.argv]),
                     "matmul_tflops": round(flops / 1e12, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # what ran survives a timeout
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    gates = {}
    for attn in filter(None, args.gates.split(",")):
        try:
            gates[attn] = packed_equals_alone(attn)
        except Exception as exc:
            gates[attn] = f"{type(exc).__name__}: {exc}"[:300]
    results["packed_vs_alone_max_rel_diff"] = gates
    print("packed vs alone:", gates, flush=True)

    seed = None
    if not args.no_baseline:
        # 16 micro-batches a step: fewer steps. The faster of the two ways to load the base is the baseline.
        baselines = {name: run_seed_recipe(examples, max(args.steps // 2, 5), 3, dtype)
                     for name, dtype in (("fp32 weights", torch.float32), ("fp16 weights", torch.float16))}
        for name, r in baselines.items():
            print(f"seed recipe, {name}: {r['tokens_per_s']:,.0f} tok/s, {r['peak_mem_gib']:.1f} GiB", flush=True)
        results["baselines"] = baselines
        seed = max(baselines.values(), key=lambda r: r["tokens_per_s"])
        results["baseline"] = seed
        save()

    variants: dict = {}
    results["variants"] = variants
    for name in args.variants.split(","):
        opts = parse_variant(name)
        rows = opts.pop("rows") or args.rows
        profile = args.out.with_name(f"profile_{name.replace('+', '_').replace('@', '_')}.txt") \
            if name == args.profile else None
        try:
            r = run_medtune(examples, rows_per_batch=rows, steps=args.steps, warmup=args.warmup, profile=profile,
                            **opts)
        except Exception as exc:  # a failing variant is recorded, the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: FAILED {variants[name]['error']}", flush=True)
            torch.cuda.empty_cache()
            continue
        r["rows_per_batch"] = rows
        r["mfu"] = r["tokens_per_s"] * 4 * r["params"] / flops
        if seed:
            r["ratio_vs_seed"] = r["tokens_per_s"] / seed["tokens_per_s"]
        r["first_losses"] = [round(x, 4) for x in r.pop("losses")[:4]]
        variants[name] = r
        save()
        print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, {r['peak_mem_gib']:.1f} GiB"
              + (f", x{r['ratio_vs_seed']:.2f}" if seed else ""), flush=True)

    ok = {k: v for k, v in variants.items() if "error" not in v}
    if not ok:
        sys.exit(1)
    best_name = max(ok, key=lambda k: ok[k]["tokens_per_s"])
    best = ok[best_name]
    results |= {"best_variant": best_name, "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"],
                "peak_mem_gib": best["peak_mem_gib"]}
    if seed:
        results |= {"baseline_tokens_per_s": seed["tokens_per_s"], "ratio": best["tokens_per_s"] / seed["tokens_per_s"]}
    save()
    print("\n| variant | tokens/s | MFU | peak GiB | x seed |\n|---|---:|---:|---:|---:|")
    if seed:
        print(f"| seed recipe | {seed['tokens_per_s']:,.0f} | {seed['tokens_per_s'] * 4 * best['params'] / flops:.1%} "
              f"| {seed['peak_mem_gib']:.1f} | 1.00 |")
    for name, r in ok.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | "
              f"{r.get('ratio_vs_seed', float('nan')):.2f} |", flush=True)
    if not args.no_correctness:
        results["correctness"] = correctness(examples, best_name)
        results["loss_rel_diff"] = results["correctness"]["max_rel_diff"]
        save()
        print(f"loss rel diff fast vs reference over 50 steps: max {results['loss_rel_diff']:.2e}")
        if not math.isfinite(results["loss_rel_diff"]):
            sys.exit(1)


if __name__ == "__main__":
    main()
