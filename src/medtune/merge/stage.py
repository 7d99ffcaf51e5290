"""Merge a LoRA adapter into its base model; write a self-contained HF model directory.

The base is loaded unquantized in its own precision (`merge.dtype: auto`): bf16 for Llama 3.2, float32 for a
dequantized GGUF base. A QLoRA adapter (trained with `train.qlora`, recorded in the adapter's manifest) merges
into the same base loaded in bf16, never into 4-bit weights: merging into NF4 would round the sum back to 4 bits
and lose most of the update. A base checkpoint that is itself stored quantized is refused with the fix.

The merge is checked: logits of the merged model are compared with base + adapter on a few prompts before it is
saved, and a difference above the dtype's tolerance fails the stage. The output holds safetensors shards, the
tokenizer with its chat template, and a generation config listing every end-of-turn id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medtune.artifacts import RunDir
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.models import (
    end_of_turn_token,
    load_model,
    load_tokenizer,
    overflows_in_fp16,
    resolve_base,
    stop_token_ids,
)
from medtune.ui import UI

# Max |logit| difference allowed between base + adapter and the merged weights, by merge dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QLORA_DTYPE = torch.bfloat16  # QLoRA computes in bf16 over the dequantized 4-bit weights


def trained_with_qlora(cfg: Config, run_dir: RunDir) -> bool:
    """Whether the adapter was trained on a 4-bit base: the adapter manifest's train config says so."""
    manifest = run_dir.manifest("adapter") or {}
    train = manifest.get("config", {}).get("train")
    return bool(train.get("qlora")) if isinstance(train, dict) else cfg.train.qlora


def check_unquantized(base: str) -> None:
    """A merge needs real weights; a checkpoint stored in 4/8 bits (e.g. a `-bnb-4bit` repo) cannot take one."""
    from transformers import AutoConfig

    quantization = getattr(AutoConfig.from_pretrained(base), "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        raise MedtuneError(
            f"base.model {base}: the checkpoint is stored quantized ({method}); a LoRA adapter must merge into "
            "unquantized weights: set base.model to the original bf16/fp16 model the quantized one was made from"
        )


def merge_dtype(cfg: Config, base: str, qlora: bool = False) -> torch.dtype:
    """auto: the base's own precision (bf16 for Llama 3.2; float32 for a dequantized GGUF base); bf16 for QLoRA."""
    overflow = overflows_in_fp16(base)
    if cfg.merge.dtype == "float16" and overflow:
        raise MedtuneError(f"merge.dtype float16: {overflow} models overflow in float16; use merge.dtype auto, "
                           "bfloat16 or float32")
    if cfg.merge.dtype != "auto":
        return DTYPES[cfg.merge.dtype]
    if qlora:
        return QLORA_DTYPE
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    dtype = DTYPES.get(str(declared).removeprefix("torch."), torch.float32)
    return torch.bfloat16 if dtype == torch.float16 and overflow else dtype


@torch.no_grad()
def _logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        out.append(model(input_ids=ids).logits.float().cpu())
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import GenerationConfig

    adapter = run_dir.require("adapter", "medtune train CONFIG", reads=("adapter_config.json", "*.safetensors"))
    base = resolve_base(cfg.base.model, cfg.base.revision)
    check_unquantized(base)
    qlora = trained_with_qlora(cfg, run_dir)
    dtype = merge_dtype(cfg, base, qlora)
    tokenizer = load_tokenizer(base, cfg.base.chat_template)
    tuned = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter)
    tuned.eval()
    reference = _logits(tuned, tokenizer, cfg.merge.check_prompts)
    with tuned.disable_adapter():
        adapter_effect = _max_diff(_logits(tuned, tokenizer, cfg.merge.check_prompts), reference)
    merged = tuned.merge_and_unload()
    diff = _max_diff(_logits(merged, tokenizer, cfg.merge.check_prompts), reference)
    tolerance = cfg.merge.tolerance or TOLERANCE[dtype]
    if diff > tolerance:
        raise MedtuneError(
            f"merge: merged logits differ from base + adapter by {diff:.4g} > merge.tolerance {tolerance} (dtype "
            f"{str(dtype).removeprefix('torch.')}); merge in higher precision (--set merge.dtype=float32) or check "
            f"that {adapter} was trained on {cfg.base.model}"
        )

    # Every end-of-turn id stops generation (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>; Gemma <eos> too).
    stops = stop_token_ids(tokenizer)
    eot = end_of_turn_token(tokenizer)
    if tokenizer.eos_token != eot:
        # A chat model's eos is the marker that ends its turn, as instruct releases ship it; a base given its chat
        # template by config still names the pre-training eos, which llama.cpp's converter would write into the GGUF
        # as the token that ends a reply.
        ui.log(f"merge: the merged tokenizer's eos is {eot} (the base's was {tokenizer.eos_token})")
        tokenizer.eos_token = eot
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = stops
    generation.pad_token_id = tokenizer.pad_token_id
    # transformers' generate() then samples as `medtune chat` and the Modelfile do, from the run's `chat` settings.
    generation.do_sample, generation.temperature, generation.top_p = True, cfg.chat.temperature, cfg.chat.top_p
    generation.max_new_tokens = cfg.chat.max_tokens
    generation.save_pretrained(out)
    _check_saved(out)
    ui.log(f"merge: max |logit| difference vs base + adapter {diff:.2e} (tolerance {tolerance}, {dtype}); the "
           f"adapter moves logits by up to {adapter_effect:.3g}" + ("; QLoRA adapter merged into the bf16 base"
                                                                  if qlora else ""))
    if adapter_effect == 0.0:
        ui.log("[yellow]warning: the adapter does not change the model's logits at all (an untrained adapter?)[/]")
    return {"dtype": str(dtype).removeprefix("torch."), "qlora": qlora, "max_logit_diff": diff,
            "tolerance": tolerance, "adapter_max_logit_change": adapter_effect,
            "check_prompts": len(cfg.merge.check_prompts)}


def _check_saved(out: Path) -> None:
    """What llama.cpp's converter and every later stage need must be in the folder."""
    if not list(out.glob("*.safetensors")):
        raise MedtuneError(f"merge: {out} holds no safetensors weights after saving")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise MedtuneError(f"merge: {out}/config.json still declares a quantization; the merged weights are not plain")
