"""QLoRA on the Llama-3.1-70B shape with FSDP2 over the GPUs of one machine: load, train, checkpoint, resume.

The base (random weights, hidden 8192, 80 layers, 64/8 heads, ffn 28672, vocab 128256) is built as `medtune train`
builds it under `train.strategy: fsdp` + `train.qlora` (train/sharded.py): on the meta device, sharded with
`fully_shard` per decoder layer, then each process quantizes one weight at a time (NF4 stored as bf16) and keeps its
rows; no process ever holds the whole model. The step is the train stage's (train/engine.py), LoRA r8 q/k/v/o,
bf16, packed 2048-token rows of bench/common.py's workload, gradient checkpointing on (turn off with
--no-checkpointing).

Checks, in order:
1. before anything large: the same base truncated to --check-layers layers, sharded, gives the loss (and LoRA
   gradient norm) of the unsharded 4-bit model built from the same weights on one process, and the first layer's
   weights as FSDP gathers them are bit for bit the weights (the 4-bit data) they were made from;
2. STEPS steps, a checkpoint at --ckpt-at (medtune's checkpoint files: adapter, optimizer, schedule, RNG);
3. resume: LoRA, optimizer and schedule re-initialised, the checkpoint loaded, the steps after it run again: the
   LoRA's tensors must come back bit for bit, and the first resumed step's loss equal the uninterrupted run's
   (relative 1e-6; the rest within 1e-3). The re-initialised state's loss at that step is recorded as a control.
Writes JSON with `gpus`, `tokens_per_s` (all GPUs, steps after the first), `peak_mem_gib_per_gpu`, `resumed`.

    python bench/fsdp_70b.py --gpus 2 --out bench/results/fsdp_70b.json                # 2 H200s, ~5 min
    python bench/fsdp_70b.py --gpus 2 --device cpu --shape tiny --layers 2 --no-qlora --out /tmp/fsdp.json
    python bench/fsdp_70b.py --gpus 2 --device cpu --shape tiny --layers 2 --steps 3 --ckpt-at 1 --out /tmp/q.json

The last one (gloo, fp32 storage for the 4-bit data) needs bitsandbytes, whose 0.50 CPU kernels run it: about
2.5 minutes on 2 cores, every check passing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import MAX_LEN, PAD, bench_setup, packed_batches, workload  # noqa: E402
from train_shapes import RandomWeights, base_shapes, count_params, four_bit_model, llama_config  # noqa: E402

from medtune.train import checkpoint, engine  # noqa: E402
from medtune.train.loss import CausalLMLoss  # noqa: E402
from medtune.train.objectives.sft import SFT  # noqa: E402
from medtune.train.optim import Adafactor  # noqa: E402
from medtune.train.parallel import Distributed, shard  # noqa: E402
from medtune.train.setup import init_lora  # noqa: E402
from medtune.train.sharded import empty_model, fill_, materialise_, to_empty_keeping_buffers  # noqa: E402

LR = 1e-3  # large enough that a few steps move the loss visibly (the resume check tells states apart)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "task_type": "CAUSAL_LM"}


def with_lora(model, checkpointing: bool, dropout: float = LORA["lora_dropout"]):
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(**LORA | {"lora_dropout": dropout}))
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def sharded_model(config, source: RandomWeights, dist: Distributed, device, qlora: bool, checkpointing: bool,
                  dropout: float = LORA["lora_dropout"]):
    """train/setup.py's fsdp path with a random base: meta model, LoRA, FSDP2, each process's shard filled."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source.shapes = base_shapes(config)
    model = with_lora(empty_model(config, dtype, config._attn_implementation, qlora), checkpointing, dropout)
    loss_model = CausalLMLoss(model)
    shard(loss_model, [p for p in model.parameters() if p.requires_grad], device, dist.world)
    materialise_(loss_model, model, source, device, dist.rank, dist.world)
    init_lora(model, 0)
    return model, loss_model


def whole_model(config, source: RandomWeights, device, qlora: bool):
    """The same base, unsharded, on this process alone (the reference of check 1)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if qlora:
        model = four_bit_model(config, device, source, dtype)
    else:
        source.shapes = base_shapes(config)
        model = empty_model(config, dtype, config._attn_implementation, qlora=False)
        to_empty_keeping_buffers(model, device)
        model.tie_weights()
        model.requires_grad_(False)
        fill_(model, source)
    model = with_lora(model, checkpointing=False, dropout=0.0)
    init_lora(model, 0)
    return model, CausalLMLoss(model)


def loss_and_grad_norm(loss_model, objective, micro, device, precision: str) -> tuple[float, float]:
    """One micro-batch's mean loss and the norm of LoRA's gradient, on this process (FSDP gathers as it goes)."""
    batch = engine.to_device(objective, objective.collate(micro), device)
    _, n = objective.counts(micro)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = objective.loss(loss_model, batch)
    (loss / n).backward()
    grads = [p.grad.float() for p in loss_model.parameters() if p.requires_grad and p.grad is not None]
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    loss_model.zero_grad(set_to_none=True)
    return float(loss.detach()) / n, norm


def gathered_mismatches(model, source: RandomWeights) -> dict[str, int]:
    """First decoder layer, gathered by FSDP (`unshard`): elements of each weight whose bits differ from the weight
    it was made from (a 4-bit weight: from quantizing that weight here). Any change of the packed 4-bit data on its
    way through FSDP's gathers (it is stored as bf16 but is not bf16 numbers) shows here, where a loss would not."""
    from medtune.train.parallel import BYTE_GATHER
    from medtune.train.sharded import NF4, checkpoint_name

    layer = model.get_base_model().model.layers[0]
    layer.unshard()
    out = {}
    with torch.no_grad():
        for module_name, module in layer.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if param.requires_grad or param_name == BYTE_GATHER:
                    continue
                key = checkpoint_name(f"model.layers.0.{module_name}" if module_name else "model.layers.0",
                                      param_name)
                expected = source.whole(key).to(param.device, param.dtype)
                if hasattr(module, "quant_state") and param_name == "weight":
                    import bitsandbytes as bnb

                    expected, _ = bnb.functional.quantize_4bit(source.whole(key), quant_storage=param.dtype, **NF4)
                bits = {2: torch.int16, 4: torch.int32}[param.element_size()]
                out[key] = int((param.detach().view(bits) != expected.reshape(param.shape).view(bits)).sum())
    layer.reshard()
    return out


def check_sharding(args, dist, device, batches) -> dict:
    """Check 1: a truncated base, sharded vs whole, same weights and batch: same loss and LoRA gradient norm."""
    config = llama_config(args.shape, args.attn, layers=args.check_layers)
    precision = "bf16" if device.type == "cuda" else "fp32"
    objective = SFT(PAD, MAX_LEN)
    micro = batches[0]
    source = RandomWeights(device)
    model, loss_model = sharded_model(config, source, dist, device, args.qlora, checkpointing=False, dropout=0.0)
    sharded = loss_and_grad_norm(loss_model, objective, micro, device, precision)
    mismatches = gathered_mismatches(model, source)
    del model, loss_model
    model, loss_model = whole_model(config, RandomWeights(device), device, args.qlora)
    whole = loss_and_grad_norm(loss_model, objective, micro, device, precision)
    del model, loss_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    loss_rel = abs(sharded[0] - whole[0]) / abs(whole[0])
    norm_rel = abs(sharded[1] - whole[1]) / max(whole[1], 1e-12)
    tol = 2e-3 if device.type == "cuda" else 1e-5
    return {"layers": args.check_layers, "loss_sharded": sharded[0], "loss_whole": whole[0],
            "loss_rel_diff": loss_rel, "grad_norm_rel_diff": norm_rel, "gathered_bits_differing": mismatches,
            "passed": loss_rel < tol and norm_rel < 10 * tol and not any(mismatches.values())}


def step_batches(batches, step: int, world: int) -> list:
    """Every process's micro-batch of a step (the same list on every process)."""
    return [batches[(step * world + r) % len(batches)] for r in range(world)]


def train_steps(setup, objective, batches, first: int, last: int, world: int, rank: int,
                save_at: int | None = None, root: Path | None = None, saved: list | None = None
                ) -> tuple[list[float], list[float], list[int]]:
    """Steps first+1..last; returns losses, each step's wall time and tokens (all processes). At `save_at` a
    checkpoint is written under `root` and LoRA's values are copied into `saved`."""
    losses, times, tokens = [], [], []
    sync = torch.cuda.synchronize if setup.device.type == "cuda" else (lambda: None)
    for step in range(first, last):
        begin = time.perf_counter()
        micros = step_batches(batches, step, world)
        counts = [objective.counts(m) for m in micros]
        units = sum(n for _, n in counts)
        loss, _ = engine.backward_step(setup, objective, [objective.collate(micros[rank])], units)
        engine.optimizer_step(setup, 1.0)
        losses.append(float(loss) / units)  # waits for the step: timed as a whole
        sync()
        times.append(time.perf_counter() - begin)
        tokens.append(sum(t for t, _ in counts))
        if save_at is not None and step + 1 == save_at:
            rng = setup.dist.gather(checkpoint.rng_state())
            if setup.dist.main:
                checkpoint.save(root, step + 1, setup.model, setup.optimizer, setup.scheduler, setup.scaler, 1, rng)
            if setup.dist.world > 1:
                torch.distributed.barrier()
            if saved is not None:
                saved.extend(p.detach().clone() for p in setup.params)
    return losses, times, tokens


def worker(args) -> None:
    dist = Distributed()
    device = torch.device("cuda", dist.local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    from medtune.train.attention import register

    register()
    precision = "bf16" if device.type == "cuda" else "fp32"
    objective = SFT(PAD, MAX_LEN)
    batches, _ = packed_batches(workload(400 if device.type == "cuda" else 60), args.rows)
    result: dict = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "date": date.today().isoformat(), "torch": torch.__version__,
                    "command": " ".join(["python", "bench/fsdp_70b.py", *sys.argv[1:]]), "gpus": dist.world,
                    "shape": args.shape, "layers": args.layers or llama_config(args.shape, "sdpa")
                    .num_hidden_layers, "qlora": args.qlora, "attention": args.attn,
                    "gradient_checkpointing": args.checkpointing, "rows_per_gpu": args.rows, "row_tokens": MAX_LEN}

    def save() -> None:
        if dist.main:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["check"] = check_sharding(args, dist, device, batches)
    save()
    if dist.main:
        print("check 1, sharded vs whole:", result["check"], flush=True)
    if not result["check"]["passed"]:
        raise SystemExit(1)

    config = llama_config(args.shape, args.attn, layers=args.layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    model, loss_model = sharded_model(config, RandomWeights(device), dist, device, args.qlora, args.checkpointing)
    result["build_s"] = round(time.perf_counter() - begin, 1)
    result["params"] = count_params(config)
    params = [p for p in model.parameters() if p.requires_grad]
    setup = bench_setup(model, loss_model, Adafactor(params, lr=LR), args.steps, precision, device)
    setup.dist = dist
    setup.scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda s: 1.0 - s / (2 * args.steps))
    saved: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if dist.world > 1:  # rank 0's folder for every process (one machine)
            shared = [str(root)]
            torch.distributed.broadcast_object_list(shared, src=0)
            root = Path(shared[0])
        losses, times, tokens = train_steps(setup, objective, batches, 0, args.steps, dist.world, dist.rank,
                                            save_at=args.ckpt_at, root=root, saved=saved)
        result |= {"losses": [round(x, 5) for x in losses], "step_s": [round(t, 3) for t in times],
                   "tokens_per_s": round(sum(tokens[1:]) / sum(times[1:]), 1) if len(times) > 1 else None,
                   "checkpoint_step": args.ckpt_at}
        save()
        # resume: the trainable state re-initialised, then the checkpoint restores it
        init_lora(model, 1)
        setup.optimizer = Adafactor(params, lr=LR)
        setup.scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda s: 1.0 - s / (2 * args.steps))
        # control: the re-initialised state's loss at the first resumed step, so the check below can tell
        micros = step_batches(batches, args.ckpt_at, dist.world)
        units = sum(objective.counts(m)[1] for m in micros)
        control, _ = engine.backward_step(setup, objective, [objective.collate(micros[dist.rank])], units)
        control = float(control) / units
        setup.optimizer.zero_grad(set_to_none=True)
        found = checkpoint.latest(root)
        start = checkpoint.load(found, model, setup.optimizer, setup.scheduler, setup.scaler, dist.rank)
        restored = all(torch.equal(a, b) for a, b in zip(params, saved, strict=True))
        resumed, _, _ = train_steps(setup, objective, batches, start, args.steps, dist.world, dist.rank)
    straight = losses[start:]
    first_rel = abs(resumed[0] - straight[0]) / abs(straight[0]) if resumed else math.inf
    worst = max(abs(a - b) / abs(b) for a, b in zip(resumed, straight)) if resumed else math.inf
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peaks = dist.everyone(round(peak, 2))
    control_rel = abs(control - straight[0]) / abs(straight[0])
    result |= {"resumed": restored and first_rel <= 1e-6 and worst < 1e-3, "resumed_from_step": start,
               "lora_restored_bitwise": restored, "control_rel_diff": control_rel,
               "resumed_losses": [round(x, 5) for x in resumed], "resume_first_step_rel_diff": first_rel,
               "resume_max_rel_diff": worst, "peak_mem_gib_per_gpu": max(peaks) if device.type == "cuda" else None,
               "peak_mem_gib_by_gpu": peaks if device.type == "cuda" else None,
               "finite": all(map(math.isfinite, losses + resumed))}
    save()
    if dist.main:
        print(f"\n| gpus | layers | tokens/s | peak GiB/GPU | build s | resumed |\n|---:|---:|---:|---:|---:|---|\n"
              f"| {dist.world} | {result['layers']} | {result['tokens_per_s']} | {result['peak_mem_gib_per_gpu']} | "
              f"{result['build_s']} | {result['resumed']} |", flush=True)
    if not (result["resumed"] and result["finite"]):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2, help="processes (one GPU each)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="70b", help="70b, 8b, 3b, 1b or tiny (bench/train_shapes.py)")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to K layers (smoke runs)")
    parser.add_argument("--check-layers", type=int, default=2)
    parser.add_argument("--no-qlora", dest="qlora", action="store_false", help="bf16 (fp32 on CPU) base")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--attn", default=None, help="default: flex_attention on GPUs, sdpa on CPUs")
    parser.add_argument("--rows", type=int, default=1, help="packed 2048-token rows per GPU a step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ckpt-at", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fsdp_70b.json"))
    args = parser.parse_args()
    args.attn = args.attn or ("flex_attention" if args.device == "cuda" else "sdpa")
    if not 0 < args.ckpt_at < args.steps:
        parser.error("--ckpt-at must be between 0 and --steps")
    if args.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            sys.exit("QLoRA needs bitsandbytes (pip install bitsandbytes); nothing was run")
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    # one process per GPU through torchrun (--standalone: a private rendezvous on a free port)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           __file__, *sys.argv[1:]]
    started = time.perf_counter()
    code = subprocess.call(cmd, env=env)
    print(f"wall {time.perf_counter() - started:.0f} s; exit {code}; wrote {args.out}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
