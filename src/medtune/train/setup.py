"""Everything a training run or a timing needs before its first step, built from the config: the process's place in a
launch, device, precision, base model + LoRA, compilation, sharding, optimizer and schedule (one `Setup`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.models import load_model, load_tokenizer, overflows_in_fp16, resolve_base
from medtune.train.loss import CausalLMLoss
from medtune.train.optim import Adafactor
from medtune.train.parallel import Distributed, shard
from medtune.ui import UI


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MedtuneError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_precision(choice: str, device: torch.device, fp16_overflow: str | None = None, ui: UI | None = None) -> str:
    """auto: bf16 on GPUs that support it, else fp16 with loss scaling; fp32 on CPU.

    `fp16_overflow` names the model type of a base whose activations overflow float16 (Gemma): fp16 is refused when
    asked for, and auto falls back to fp32 (with a notice) where bf16 is missing.
    """
    if choice == "fp16" and fp16_overflow:
        raise MedtuneError(f"train.precision fp16: {fp16_overflow} models overflow in float16; use precision bf16 "
                           "(or auto) on a GPU, fp32 on a CPU")
    if device.type == "cpu":
        if choice in ("fp16",):
            raise MedtuneError("train.precision fp16 needs a GPU; use precision auto or fp32 on CPU")
        return "fp32" if choice == "auto" else choice
    if choice == "auto":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if fp16_overflow:
            if ui is not None:
                ui.log(f"train: this GPU has no bf16 and {fp16_overflow} overflows in fp16: training in fp32")
            return "fp32"
        return "fp16"
    return choice


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adafactor":
        # What transformers' Trainer builds for optim="adafactor" (a fixed external learning rate), batched.
        return Adafactor(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def apply_lora(model: Any, cfg: Config, ui: UI, base: str) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    tied = {"lm_head", "embed_tokens"} & set(lora.target_modules)
    if tied and getattr(model.config, "tie_word_embeddings", False):
        ui.log(f"[yellow]warning: LoRA on {sorted(tied)}, which are tied in this model: the adapter changes both the "
               "input embeddings and the output head[/]")
    extra = {}
    if lora.trainable_tokens:
        tokenizer = load_tokenizer(base, cfg.base.chat_template)
        vocab = tokenizer.get_vocab()
        missing = [t for t in lora.trainable_tokens if t not in vocab]
        if missing:
            raise MedtuneError(f"train.lora.trainable_tokens: {missing[0]!r} is not a token of this tokenizer")
        extra["trainable_token_indices"] = [vocab[t] for t in lora.trainable_tokens]
        unknown = [t for t in lora.trainable_tokens_from.values() if t not in vocab]
        if unknown:
            raise MedtuneError(f"train.lora.trainable_tokens_from: {unknown[0]!r} is not a token of this tokenizer")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        use_dora=lora.dora, task_type="CAUSAL_LM", **extra)
    model = get_peft_model(model, config)
    if lora.trainable_tokens_from:
        start_token_rows(model, {vocab[t]: vocab[src] for t, src in lora.trainable_tokens_from.items()})
    return model


def start_token_rows(model: Any, starts: dict[int, int]) -> None:
    """Trainable token rows start as copies of other rows ({token id: id of the row it copies}) of the same weight.
    A tied head shares the embedding's trainable rows, so the copy reaches the output side too."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, TrainableTokensLayer) or module.tied_adapter is not None:
                continue
            weight = module.get_base_layer().weight
            for name, delta in module.trainable_tokens_delta.items():
                for row, index in enumerate(module.token_indices[name]):
                    if index in starts:
                        delta[row] = weight[starts[index]].to(delta.dtype)


def init_lora(model: Any, seed: int) -> None:
    """LoRA's starting values from the seed alone, by PEFT's own initialiser: the same whether the base was loaded
    whole or made empty and sharded (where LoRA's tensors start as empty memory)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.reset_lora_parameters(name, model.peft_config[name].init_lora_weights)


def training_dtype(precision: str) -> torch.dtype:
    """The frozen base's dtype: bf16 under bf16, fp32 master weights otherwise (fp16 trains under autocast)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_base_for_training(base: str, precision: str, device: torch.device, qlora: bool, attention: str,
                           base_precision: str = "bf16", ui: UI | None = None) -> Any:
    """fp16 trains fp32 master weights under autocast with a loss scaler (as the seed's Trainer did); bf16 keeps the
    frozen base in bf16 and the LoRA weights in fp32 (PEFT's autocast_adapter_dtype); QLoRA loads it in 4-bit;
    base_precision fp8 loads it in bf16 and quantizes the decoder's linear weights to FP8, one at a time."""
    if attention == "varlen":
        from medtune.train.attention import register

        register()
    if not qlora:
        model = load_model(base, dtype=training_dtype(precision), device=str(device), attention=attention)
        if base_precision == "fp8":
            from medtune.train.fp8 import quantize_base_

            done = quantize_base_(model)
            if ui is not None:
                ui.log(f"train: {done['converted']} linear weights of the base in FP8 (e4m3, a scale per row)"
                       + (f", {done['kept_bf16']} kept in bf16 (sizes not multiples of 16)"
                          if done["kept_bf16"] else ""))
        return model
    if device.type != "cuda":
        raise MedtuneError("train.qlora needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora=false on this machine")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        raise MedtuneError("train.qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training

    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    extra = {} if attention == "auto" else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": device.index or 0},
                                                 **extra)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def empty_base_for_sharding(cfg: Config, base: str, precision: str, device: torch.device) -> Any:
    """The base on the meta device, for FSDP to shard before any weight is read (see train/sharded.py)."""
    from transformers import AutoConfig

    from medtune.train.sharded import empty_model, model_folder

    tc = cfg.train
    if tc.qlora and device.type != "cuda":
        raise MedtuneError("train.qlora needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora=false on this machine")
    if tc.qlora and precision != "bf16":
        raise MedtuneError("train.qlora with train.strategy fsdp needs train.precision bf16 (the 4-bit weights are "
                           "stored as bf16 so that FSDP can shard them)")
    if tc.lora.dora:
        raise MedtuneError("train.lora.dora does not combine with train.strategy fsdp (DoRA's magnitudes need each "
                           "whole weight); use strategy ddp")
    if tc.lora.trainable_tokens:
        raise MedtuneError("train.lora.trainable_tokens does not combine with train.strategy fsdp (their rows start "
                           "from the whole embedding); use strategy ddp")
    if tc.attention == "varlen":
        from medtune.train.attention import register

        register()
    config = AutoConfig.from_pretrained(model_folder(base, cfg.base.revision))
    return empty_model(config, training_dtype(precision), tc.attention, tc.qlora)


@dataclass
class Setup:
    cfg: Config
    dist: Distributed
    device: torch.device
    precision: str
    model: Any  # the PEFT model
    loss_model: CausalLMLoss  # the root module (sharded under fsdp)
    params: list[torch.nn.Parameter]  # the trainable tensors
    weights_gib: float  # what this process holds of the weights
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    window: int  # micro-batches per optimizer step, over all processes
    total_steps: int

    def autocast(self) -> Any:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def placement(cfg: Config, ui: UI | None = None) -> tuple[Distributed, torch.device, str]:
    """This process's place in the launch, its device and the precision it trains in (bf16 or fp32 where the base
    overflows in fp16)."""
    tc = cfg.train
    dist = Distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device("cuda", dist.local_rank) if dist.world > 1 and torch.cuda.is_available() \
        else pick_device(tc.device)
    if tc.base_precision == "fp8":  # refused here, before the base is even resolved, where the card has no FP8
        from medtune.train.fp8 import require_support

        require_support(device)
    base = resolve_base(cfg.base.model, cfg.base.revision)
    precision = pick_precision(tc.precision, device, overflows_in_fp16(base), ui)
    if tc.base_precision == "fp8":
        require_support(device, precision)
    return dist, device, precision


def build(cfg: Config, n_items: int, ui: UI) -> Setup:
    """Device, model, LoRA, compilation, sharding, optimizer and the linear schedule over `n_items` items a epoch."""
    from transformers import get_linear_schedule_with_warmup

    tc = cfg.train
    dist, device, precision = placement(cfg, ui)
    if tc.attention in ("varlen", "flex_attention") and device.type != "cuda":
        raise MedtuneError(f"train.attention {tc.attention} trains on a CUDA GPU only (PyTorch has no CPU backward "
                           "for it); use train.attention=auto on this machine")
    base = resolve_base(cfg.base.model, cfg.base.revision)
    torch.manual_seed(cfg.seed)
    sharded = tc.strategy == "fsdp" and dist.world > 1
    if sharded:  # made on the meta device; each process fills only its shard below
        model = apply_lora(empty_base_for_sharding(cfg, base, precision, device), cfg, ui, base)
    else:
        model = apply_lora(load_base_for_training(base, precision, device, tc.qlora, tc.attention,
                                                  tc.base_precision, ui), cfg, ui, base)
    if tc.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and under torch.compile
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    loss_model = CausalLMLoss(model)
    if sharded:
        from medtune.train.sharded import SafetensorsSource, materialise_, model_folder

        shard(loss_model, [p for p in model.parameters() if p.requires_grad], device, dist.world)
        source = SafetensorsSource(model_folder(base, cfg.base.revision))
        materialise_(loss_model, model, source, device, dist.rank, dist.world)
    init_lora(model, cfg.seed)  # the same on every process
    if tc.compile:
        # In place (Module.compile), so parameter names and the saved adapter stay as they are. The loss's gather
        # of labelled positions has a data-dependent shape and stays outside the compiled graph. Sharded, each
        # decoder layer is compiled on its own and FSDP's gathers run between them (as torchtitan does).
        decoder = model.get_base_model().model
        for part in (decoder.layers if sharded else [decoder]):
            part.compile()
        ui.log("train: the decoder is compiled on its first batches (one to several minutes before the first step)")
    params = [p for p in model.parameters() if p.requires_grad]
    # what this process holds (a sharded parameter's local part)
    weights_gib = round(sum(getattr(p, "_local_tensor", p).nbytes for p in model.parameters()) / 2**30, 4)
    torch.manual_seed(cfg.seed + dist.rank)  # LoRA dropout draws differ between processes

    window = tc.grad_accum * dist.world
    steps_per_epoch = math.ceil(math.ceil(n_items / tc.batch_size) / window)
    total_steps = tc.max_steps or math.ceil(steps_per_epoch * tc.epochs)
    optimizer = build_optimizer(cfg, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    return Setup(cfg, dist, device, precision, model, loss_model, params, weights_gib, optimizer, scheduler,
                 scaler, window, total_steps)
