"""Training throughput of larger bases on one GPU: the Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes, and the
8B shape under QLoRA, with random weights on bench/train_throughput.py's workload and fast path.

Workload: bench/train_throughput.py's synthetic ReasonMed-like examples packed into 2048-token rows (4 rows a
micro-batch by default), LoRA r8/alpha16/dropout 0.05 on q/k/v/o, bf16 base + fp32 LoRA, medtune's training step
(train/engine.py: fused chunked head, batched Adafactor, no host waits), flex attention, compiled decoder layers.
MFU = tokens/s x 4 x N_params / (dense bf16 matmul FLOP/s measured in this run on this card), as there.
Models are made on the GPU directly (random init there, no CPU pass over 8B parameters). The QLoRA shape is built
the way `train.strategy fsdp` + `train.qlora` builds a base (train/sharded.py: meta device, NF4 stored as bf16,
quantized one weight at a time on the GPU) and needs bitsandbytes; without it the shape is recorded as skipped.

Checks before any timing: packed rows give each example its loss alone (flex, 1B shape); per shape, the first
step's loss is within 5% of ln(vocab) + 0.02^2 x hidden / 2 (a random head's logits) and every loss is finite;
the 4-bit weights dequantize to the weights they came from (relative error < 0.15) and a 4-bit layer computes
x @ dequantized.T. A shape whose compiled run fails is run again uncompiled (the failure is recorded).

    python bench/train_shapes.py --out bench/results/train_throughput_shapes.json            # on an H200, ~5 min
    python bench/train_shapes.py --shapes tiny --device cpu --out /tmp/shapes.json            # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import zlib
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (  # noqa: E402
    MAX_LEN,
    PAD,
    bench_setup,
    matmul_flops,
    packed_batches,
    packed_equals_alone,
    workload,
)

from medtune.train import engine  # noqa: E402
from medtune.train.loss import CausalLMLoss  # noqa: E402
from medtune.train.objectives.sft import SFT  # noqa: E402
from medtune.train.optim import Adafactor  # noqa: E402

LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": PAD}
SHAPES = {  # (hidden, layers, heads, kv heads, head dim, ffn, tied)
    "1b": (2048, 16, 32, 8, 64, 8192, True),
    "3b": (3072, 28, 24, 8, 128, 8192, True),
    "8b": (4096, 32, 32, 8, 128, 14336, False),
    "70b": (8192, 80, 64, 8, 128, 28672, False),
    "tiny": (128, 2, 4, 2, 32, 256, True),
}


def llama_config(shape: str, attn: str, layers: int | None = None, vocab: int | None = None):
    from transformers import LlamaConfig

    hidden, n_layers, heads, kv, head_dim, ffn, tied = SHAPES[shape]
    extra = dict(LLAMA3)
    if vocab:
        extra["vocab_size"] = vocab
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=head_dim, intermediate_size=ffn, tie_word_embeddings=tied,
                       attn_implementation=attn, **extra)


def count_params(config) -> int:
    """Parameters of the full-precision model of `config` (counted on the meta device; a tied head once)."""
    from medtune.train.sharded import empty_model

    model = empty_model(config, torch.bfloat16, "auto", qlora=False)
    return sum(p.numel() for p in model.parameters())


class RandomWeights:
    """A random base by checkpoint name, the same on every process and every call: N(0, 0.02) matrices, unit norm
    weights; made on `device` (a seeded generator per name, so a process can make any weight it needs alone)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        self.device, self.dtype, self.seed = device, dtype, seed
        self.shapes: dict[str, tuple[int, ...]] = {}

    def whole(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        out.normal_(0.0, 0.02, generator=generator)
        return out.to(self.dtype)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.whole(name)[start:stop]


def base_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every weight of the model of `config` (from a meta-device model)."""
    from medtune.train.sharded import empty_model

    model = empty_model(config, torch.bfloat16, "auto", qlora=False)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def four_bit_check(model, source: RandomWeights) -> dict:
    """The first 4-bit layer (one process, before LoRA): its weight dequantizes to the weight it came from, and it
    computes x @ dequantized.T."""
    import bitsandbytes as bnb

    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    key = f"{name}.weight"
    original = source.whole(key).float()
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.quant_state).float()
    rel = float((dequantized - original).norm() / original.norm())
    x = torch.randn(8, original.shape[1], device=original.device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x).float()
    expected = x.float() @ dequantized.to(torch.bfloat16).float().t()
    out_rel = float((out - expected).norm() / expected.norm())
    return {"layer": key, "dequantized_vs_original_rel": round(rel, 4), "forward_vs_dequantized_rel":
            round(out_rel, 5), "passed": rel < 0.15 and out_rel < 2e-2}


def four_bit_model(config, device: torch.device, source: RandomWeights, dtype: torch.dtype = torch.bfloat16):
    """train/sharded.py's QLoRA base on one process: meta model, NF4 stored as `dtype`, filled weight by weight."""
    import bitsandbytes as bnb

    from medtune.train.sharded import empty_model, fill_, to_empty_keeping_buffers

    source.shapes = base_shapes(config)
    model = empty_model(config, dtype, config._attn_implementation, qlora=True)
    to_empty_keeping_buffers(model, device)
    model.tie_weights()
    model.requires_grad_(False)
    fill_(model, source)
    for module in model.modules():  # the quantization state on each weight now, not on its first (compiled) call
        if isinstance(module, bnb.nn.Linear4bit):
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(module)
    return model


def build(shape: str, attn: str, device: torch.device, qlora: bool, compile_mode: str, dropout: float = 0.05,
          layers: int | None = None):
    """The PEFT model, its loss module, the parameter count, and (QLoRA) the 4-bit check."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.train.setup import init_lora

    config = llama_config(shape, attn, layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = count_params(config)
    check = None
    torch.manual_seed(0)
    if qlora:
        source = RandomWeights(device)
        model = four_bit_model(config, device, source, dtype)
        check = four_bit_check(model, source)
    else:
        with device:  # random init on the GPU itself
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    init_lora(model, 0)
    if compile_mode == "layers":  # one graph for all layers: compile time independent of depth
        for layer in model.get_base_model().model.layers:
            layer.compile()
    elif compile_mode == "decoder":  # what the train stage does on one GPU
        model.get_base_model().model.compile()
    return model, CausalLMLoss(model), params, check


def run_shape(shape: str, examples, args, device: torch.device, flops: float | None, compile_mode: str) -> dict:
    qlora = shape.endswith("-qlora")
    name = shape.removesuffix("-qlora")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, loss_model, params, check = build(name, args.attn, device, qlora, compile_mode, layers=args.layers)
    built_s = time.perf_counter() - start
    if check is not None and not check["passed"]:
        return {"error": "4-bit check failed", "qlora_check": check}
    rows = args.rows
    batches, eff = packed_batches(examples, rows)
    opt = Adafactor([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    setup = bench_setup(model, loss_model, opt, args.warmup + args.steps,
                        precision="bf16" if device.type == "cuda" else "fp32", device=device)
    objective = SFT(PAD, MAX_LEN)
    losses = []

    def one_step(step: int) -> int:
        micro = batches[step % len(batches)]
        tokens, n = objective.counts(micro)
        loss, _ = engine.backward_step(setup, objective, [objective.collate(micro)], n)
        engine.optimizer_step(setup, 1.0)
        losses.append(loss / n)
        return tokens

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm_start = time.perf_counter()
    for step in range(args.warmup):
        one_step(step)
    sync()
    warmup_s = time.perf_counter() - warm_start
    first = float(losses[0])
    # random N(0, 0.02) head over a unit-RMS final hidden state: logits of variance 0.02^2 x hidden around 0
    expected = math.log(model.config.vocab_size) + 0.5 * 0.02**2 * model.config.hidden_size
    if not abs(first - expected) / expected < 0.05:
        return {"error": f"first loss {first:.3f} is not near ln(vocab) + var/2 = {expected:.3f}"}
    begin = time.perf_counter()
    tokens = sum(one_step(step) for step in range(args.warmup, args.warmup + args.steps))
    sync()
    elapsed = time.perf_counter() - begin
    values = [float(x) for x in losses]
    if not all(map(math.isfinite, values)):
        return {"error": f"non-finite loss: {values}"}
    tokens_per_s = tokens / elapsed
    result = {"tokens_per_s": round(tokens_per_s, 1), "mfu": round(tokens_per_s * 4 * params / flops, 4)
              if flops else None,
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
              "params": params, "rows_per_batch": rows, "row_tokens": MAX_LEN, "packing_efficiency": round(eff, 4),
              "qlora": qlora, "compile": compile_mode, "steps_timed": args.steps, "warmup_steps": args.warmup,
              "build_s": round(built_s, 1), "warmup_s": round(warmup_s, 1),
              "first_losses": [round(x, 4) for x in values[:3]], "last_loss": round(values[-1], 4)}
    if check is not None:
        result["qlora_check"] = check
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,3b,8b,8b-qlora", help="of 1b, 3b, 8b, tiny, each optionally -qlora")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn", default=None, help="default: flex_attention on a GPU, sdpa on a CPU")
    parser.add_argument("--compile", default=None, choices=["layers", "decoder", "none"],
                        help="default: layers on a GPU (one graph for all layers), none on a CPU")
    parser.add_argument("--rows", type=int, default=None, help="packed 2048-token rows a micro-batch (GPU 4, CPU 1)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="truncate every shape to K layers (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput_shapes.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.attn = args.attn or ("flex_attention" if gpu else "sdpa")
    args.compile = args.compile or ("layers" if gpu else "none")
    args.rows = args.rows or (4 if gpu else 1)
    if not gpu:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    from medtune.train.attention import register

    register()
    import transformers

    card = torch.cuda.get_device_name() if gpu else "cpu"
    flops = matmul_flops() if gpu else None
    results: dict = {"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "command": " ".join(["python", *sys.argv]),
                     "matmul_tflops": round(flops / 1e12, 1) if flops else None, "attention": args.attn,
                     "compile": args.compile, "shapes": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    if gpu and args.attn == "flex_attention":
        gate = packed_equals_alone(args.attn)
        results["packed_vs_alone_max_rel_diff"] = gate
        print(f"packed vs alone ({args.attn}): {gate:.2e}", flush=True)
        if not gate < 1e-2:
            save()
            sys.exit(f"packed rows do not give each example its own loss ({gate:.2e}); nothing timed")
    examples = workload(3000 if gpu else 200)
    failed = False
    for shape in args.shapes.split(","):
        if shape.endswith("-qlora"):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                results["shapes"][shape] = {"skipped": "bitsandbytes not installed"}
                print(f"{shape}: skipped (bitsandbytes not installed)", flush=True)
                save()
                continue
        started = time.perf_counter()
        try:
            r = run_shape(shape, examples, args, device, flops, args.compile)
        except Exception as exc:  # recorded; the other shapes still run
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if "error" in r and args.compile != "none":  # the shape uncompiled, with why compiling failed
            print(f"{shape}: compiled run failed ({r['error'][:200]}); again without compile", flush=True)
            gc.collect()
            torch._dynamo.reset()
            if gpu:
                torch.cuda.empty_cache()
            try:
                r = run_shape(shape, examples, args, device, flops, "none") | {"compiled_run_error": r["error"]}
            except Exception as exc:
                r = {"error": f"{type(exc).__name__}: {exc}"[:500], "compiled_run_error": r["error"]}
        r["wall_s"] = round(time.perf_counter() - started, 1)
        failed |= "error" in r
        results["shapes"][shape] = r
        save()
        print(f"{shape}: {r}", flush=True)
        gc.collect()
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()
    print("\n| shape | tokens/s | MFU | peak GiB |\n|---|---:|---:|---:|")
    for shape, r in results["shapes"].items():
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"| {shape} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} |")
        else:
            print(f"| {shape} | {r.get('skipped') or r.get('error')} | | |")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
