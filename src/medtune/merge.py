"""Merge a LoRA adapter into its base model; write a self-contained HF model directory.

The merge is checked: logits of the merged model are compared with base + adapter on a few prompts before it is
saved, and a difference above the dtype's tolerance fails the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medtune.artifacts import RunDir
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.models import load_model, load_tokenizer, resolve_base, stop_token_ids
from medtune.ui import UI

# Max |logit| difference allowed between base + adapter and the merged weights, by merge dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merge_dtype(cfg: Config, base: str) -> torch.dtype:
    """auto: the base's own precision (bf16 for Llama 3.2; float32 for a dequantized GGUF base)."""
    if cfg.merge.dtype != "auto":
        return DTYPES[cfg.merge.dtype]
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    return DTYPES.get(str(declared).removeprefix("torch."), torch.float32)


@torch.no_grad()
def _logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        out.append(model(input_ids=ids).logits.float().cpu())
    return out


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import GenerationConfig

    adapter = run_dir.require("adapter", "medtune train CONFIG")
    base = resolve_base(cfg.base.model, cfg.base.revision)
    dtype = merge_dtype(cfg, base)
    tokenizer = load_tokenizer(base)
    tuned = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter)
    tuned.eval()
    reference = _logits(tuned, tokenizer, cfg.merge.check_prompts)
    merged = tuned.merge_and_unload()
    diff = max(float((a - b).abs().max()) for a, b in zip(_logits(merged, tokenizer, cfg.merge.check_prompts),
                                                          reference))
    tolerance = cfg.merge.tolerance or TOLERANCE[dtype]
    if diff > tolerance:
        raise MedtuneError(f"merge: merged logits differ from base + adapter by {diff:.4g} > {tolerance} "
                           f"(dtype {dtype}); the adapter does not match this base")

    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = GenerationConfig()
    # Every end-of-turn id stops generation (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
    generation.eos_token_id = stop_token_ids(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample, generation.temperature, generation.top_p = True, cfg.chat.temperature, cfg.chat.top_p
    generation.save_pretrained(out)
    ui.log(f"merge: max |logit| difference vs base + adapter {diff:.2e} (tolerance {tolerance}, {dtype})")
    return {"dtype": str(dtype).removeprefix("torch."), "max_logit_diff": diff, "tolerance": tolerance}
