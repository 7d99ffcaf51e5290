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

A shape named `-fp8` (`train.base_precision: fp8`, train/fp8.py) is the same model, seed and batches with the
decoder's linear weights quantized to FP8 after it is built. Before its timing, on the GPU: the FP8 layer's forward
and input gradient against the same quantized arithmetic done in fp32 (the kernel) and against the bf16 weights
(the quantization), gradients quantized to e4m3 and to e5m2; odd row counts; the raw FP8 and bf16 matmul rates;
and one step of a 2-layer 1B model, fp8 against bf16, under varlen attention with gradient checkpointing, summed
and through the per-token head of the preference objectives. Every shape runs `--loss-steps` steps
(the timed ones among them); an fp8 row records its tokens/s against the bf16 row of the same size
(`speedup_vs_bf16`) and the largest relative difference of its per-step loss from that row's
(`loss_rel_diff_vs_bf16`).

    python bench/train_shapes.py --out bench/results/train_throughput_shapes.json            # on an H200, ~5 min
    python bench/train_shapes.py --shapes 1b,1b-fp8,3b,3b-fp8,8b,8b-fp8 --profile 1b-fp8,8b-fp8  # fp8 beside bf16
    python bench/train_shapes.py --shapes tiny,tiny-fp8 --device cpu --out /tmp/shapes.json   # smoke run on a CPU
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
    summarize_profile,
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
          layers: int | None = None, fp8: bool = False):
    """The PEFT model, its loss module, the parameter count, and (QLoRA) the 4-bit check. `fp8`: the same model
    with its decoder's linear weights in FP8 (train/fp8.py), as `train.base_precision: fp8` loads it."""
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
        if fp8:
            from medtune.train.fp8 import quantize_base_

            quantize_base_(model)
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _timed_tflops(fn, flop: float) -> float:
    import statistics

    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return round(flop / statistics.median(times) / 1e12, 1)


def fp8_kernel_check() -> dict:
    """The FP8 layer on the GPU against the same quantized arithmetic in fp32 (the kernel) and against the bf16
    weights (what quantization costs), its input gradient with e4m3 and e5m2 gradients, odd row counts, and the
    raw FP8 (row-wise scaled) and bf16 matmul rates."""
    from medtune.train import fp8

    torch.manual_seed(0)
    m, k, n = 4096, 4096, 4096
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, 0.0, 0.02)
    layer = fp8.Fp8Linear.from_linear(linear)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out: dict = {}
    y = layer(x)
    q, scale = fp8.quantize_rows(x.detach(), fp8.ACTIVATION_DTYPE)
    out["forward_vs_emulated"] = _rel(y, fp8.dequantize_rows(q, scale) @ layer.dequantized_weight().t())
    out["forward_vs_bf16_weights"] = _rel(y, x.detach().float() @ linear.weight.float().t())
    exact = dy.float() @ linear.weight.float()
    for name, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        fp8.GRADIENT_DTYPE, x.grad = dtype, None
        try:
            layer(x).backward(dy)
            out[f"grad_{name}_vs_exact"] = _rel(x.grad, exact)
            gq, gs = fp8.quantize_rows(dy.float() * layer.weight_scale, dtype)
            out[f"grad_{name}_vs_emulated"] = _rel(x.grad, fp8.dequantize_rows(gq, gs) @ layer.fp8_weight.float())
        except RuntimeError as exc:
            out[f"grad_{name}_error"] = str(exc)[:300]
    fp8.GRADIENT_DTYPE = torch.float8_e4m3fn
    for rows in (7, 100):
        try:
            small = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            out[f"rows_{rows}_vs_bf16_weights"] = _rel(layer(small), small.float() @ linear.weight.float().t())
        except RuntimeError as exc:
            out[f"rows_{rows}_error"] = str(exc)[:300]
    out |= matmul_rates()
    out["passed"] = (out["forward_vs_emulated"] < 1e-2 and out.get("grad_e4m3_vs_emulated", 1.0) < 1e-2
                     and out["forward_vs_bf16_weights"] < 0.1 and out.get("grad_e4m3_vs_exact", 1.0) < 0.1)
    return {key: round(v, 6) if isinstance(v, float) else v for key, v in out.items()}


def matmul_rates() -> dict:
    """TFLOP/s of bf16 and row-wise scaled FP8 matrix multiplies at the 8B shape's sizes (8192 tokens)."""
    from medtune.train import fp8

    out = {}
    for m, k, n in ((8192, 8192, 8192), (8192, 4096, 14336), (8192, 14336, 4096)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        qa, sa = fp8.quantize_rows(a, torch.float8_e4m3fn)
        qb, sb = fp8.quantize_rows(b, torch.float8_e4m3fn)
        out[f"tflops_bf16_{m}x{k}x{n}"] = _timed_tflops(lambda a=a, b=b: a @ b.t(), 2 * m * k * n)
        out[f"tflops_fp8_rowwise_{m}x{k}x{n}"] = _timed_tflops(
            lambda qa=qa, qb=qb, sa=sa, sb=sb: fp8.scaled_mm(qa, qb.t(), sa, sb.t()), 2 * m * k * n)
    return out


def _one_step_grads(model, loss_model, batch: dict, per_token: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = loss_model(batch["input_ids"], batch["position_ids"], batch["label_index"], batch["targets"],
                         batch.get("cu_seq_lens"), per_token=per_token)
    value = out.sum() if per_token else out
    value.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    return float(value), grads


# (attention, gradient checkpointing, per-token log-probabilities); flex attention, compiled, with the summed loss
# is what the timed shapes run
COMPOSITIONS = (("varlen", True, False), ("varlen", True, True))


def fp8_composition_check(examples) -> dict:
    """One step of a 2-layer 1B model, fp8 against bf16 (same init, same packed row, dropout 0, uncompiled): loss
    and LoRA gradients in each of COMPOSITIONS (the per-token log-probabilities are the preference objectives')."""
    from medtune.train.objectives.sft import collate

    batch = {k: v.cuda() for k, v in collate(packed_batches(examples, 1)[0][0], PAD, MAX_LEN).items()}
    out: dict = {}
    for attn, ckpt, per_token in COMPOSITIONS:
        found = []
        for fp8 in (False, True):
            model, loss_model, _, _ = build("1b", attn, torch.device("cuda"), False, "none", dropout=0.0, layers=2,
                                            fp8=fp8)
            if ckpt:
                model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            found.append(_one_step_grads(model, loss_model, batch, per_token))
            del model, loss_model
        (loss16, g16), (loss8, g8) = found
        key = f"{attn}{'+ckpt' if ckpt else ''}{'+per_token' if per_token else ''}"
        out[key] = {"loss_rel_diff": round(abs(loss8 - loss16) / abs(loss16), 6),
                    "grad_cosine": round(float(torch.nn.functional.cosine_similarity(g8, g16, dim=0)), 5)}
    out["passed"] = all(v["loss_rel_diff"] < 1e-2 and v["grad_cosine"] > 0.98 for v in out.values())
    return out


def compare_fp8(shapes: dict) -> None:
    """Each fp8 row against the bf16 row of its size in the same run: tokens/s, peak memory, per-step loss."""
    for name, row in shapes.items():
        ref = shapes.get(name.removesuffix("-fp8"))
        if not name.endswith("-fp8") or "tokens_per_s" not in row or not ref or "tokens_per_s" not in ref:
            continue
        steps = min(len(row["losses"]), len(ref["losses"]))
        row["speedup_vs_bf16"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 4)
        if row["peak_mem_gib"] is not None:
            row["peak_mem_vs_bf16"] = round(row["peak_mem_gib"] / ref["peak_mem_gib"], 4)
        rel = [abs(a - b) / abs(b) for a, b in zip(row["losses"][:steps], ref["losses"][:steps])]
        row["loss_rel_diff_vs_bf16"] = round(max(rel), 6)
        row["loss_rel_diff_mean"] = round(sum(rel) / steps, 6)
        row["loss_steps_compared"] = steps


def run_shape(shape: str, examples, args, device: torch.device, flops: float | None, compile_mode: str) -> dict:
    qlora, fp8 = shape.endswith("-qlora"), shape.endswith("-fp8")
    name = shape.removesuffix("-qlora").removesuffix("-fp8")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, loss_model, params, check = build(name, args.attn, device, qlora, compile_mode, layers=args.layers,
                                             fp8=fp8)
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
    for step in range(args.warmup + args.steps, args.loss_steps):  # the rest of the loss comparison, untimed
        one_step(step)
    if shape in args.profile:  # after the timed steps, so the profiler's own cost is not in the number
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for step in range(3):
                one_step(step)
            sync()
        summarize_profile(prof, args.out.with_name(f"profile_shapes_{shape}.txt"))
        del losses[max(args.loss_steps, args.warmup + args.steps):]
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
              "first_losses": [round(x, 4) for x in values[:3]], "last_loss": round(values[-1], 4),
              "fp8": fp8, "losses": values}
    if check is not None:
        result["qlora_check"] = check
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,1b-fp8,3b,3b-fp8,8b,8b-fp8,8b-qlora",
                        help="of 1b, 3b, 8b, tiny, each optionally -qlora or -fp8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn", default=None, help="default: flex_attention on a GPU, sdpa on a CPU")
    parser.add_argument("--compile", default=None, choices=["layers", "decoder", "none"],
                        help="default: layers on a GPU (one graph for all layers), none on a CPU")
    parser.add_argument("--rows", type=int, default=None, help="packed 2048-token rows a micro-batch (GPU 4, CPU 1)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="truncate every shape to K layers (smoke runs)")
    parser.add_argument("--loss-steps", type=int, default=50, help="steps run per shape (timed ones included): "
                        "the per-step loss an fp8 row is compared on")
    parser.add_argument("--skip-packed-gate", action="store_true", help="no packed-vs-alone check (short calls)")
    parser.add_argument("--profile", default="", help="shapes whose 3 steps after timing are profiled (kernels)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput_shapes.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.attn = args.attn or ("flex_attention" if gpu else "sdpa")
    args.compile = args.compile or ("layers" if gpu else "none")
    args.rows = args.rows or (4 if gpu else 1)
    if not gpu:
        args.steps, args.warmup, args.loss_steps = min(args.steps, 2), min(args.warmup, 1), min(args.loss_steps, 4)
    args.profile = set(filter(None, args.profile.split(",")))
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

    if gpu and args.attn == "flex_attention" and not args.skip_packed_gate:
        gate = packed_equals_alone(args.attn)
        results["packed_vs_alone_max_rel_diff"] = gate
        print(f"packed vs alone ({args.attn}): {gate:.2e}", flush=True)
        if not gate < 1e-2:
            save()
            sys.exit(f"packed rows do not give each example its own loss ({gate:.2e}); nothing timed")
    examples = workload(3000 if gpu else 200)
    if gpu and any(shape.endswith("-fp8") for shape in args.shapes.split(",")):
        try:
            results["fp8_kernel_check"] = fp8_kernel_check()
        except Exception as exc:  # recorded; the bf16 shapes still run
            results["fp8_kernel_check"] = {"error": f"{type(exc).__name__}: {exc}"[:500], "passed": False}
        print(f"fp8 kernel: {results['fp8_kernel_check']}", flush=True)
        try:
            results["fp8_composition_check"] = fp8_composition_check(examples)
        except Exception as exc:  # recorded; the timed shapes still run
            results["fp8_composition_check"] = {"error": f"{type(exc).__name__}: {exc}"[:500], "passed": False}
        print(f"fp8 composition: {results['fp8_composition_check']}", flush=True)
        save()
        if not results["fp8_kernel_check"]["passed"]:
            args.shapes = ",".join(s for s in args.shapes.split(",") if not s.endswith("-fp8"))
            print("fp8 checks failed: the fp8 shapes are not timed", flush=True)
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
    compare_fp8(results["shapes"])
    save()
    print("\n| shape | tokens/s | MFU | peak GiB | x bf16 | loss rel diff |\n|---|---:|---:|---:|---:|---:|")
    for shape, r in results["shapes"].items():
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"| {shape} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | {r.get('speedup_vs_bf16', '-')} | "
                  f"{r.get('loss_rel_diff_vs_bf16', '-')} |")
        else:
            print(f"| {shape} | {r.get('skipped') or r.get('error')} | | | | |")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
