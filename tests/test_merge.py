"""The merge stage on a tiny random Llama with a freshly initialised LoRA adapter whose B is not zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medtune.artifacts import RunDir, write_manifest
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.merge import stage as merge
from medtune.ui import UI

PROMPTS = ["Which vitamin deficiency causes scurvy?", "Name one beta-blocker."]


def make_config(run_dir: Path, base: Path, chat: dict | None = None, **merge_options) -> Config:
    return Config.model_validate({
        "name": "tiny", "run_dir": str(run_dir), "base": {"model": str(base)},
        "data": {"path": str(run_dir / "unused.jsonl")}, "export": {"name": "tiny"},
        "merge": {"check_prompts": PROMPTS, **merge_options}, "chat": chat or {},
    })


def make_adapter(run_dir: RunDir, base: Path, qlora: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved like the train stage saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    tuned = get_peft_model(model, lora)
    folder = run_dir / "adapter"
    tuned.save_pretrained(folder)
    write_manifest(folder, "train", "fp", {"train": {"qlora": qlora}}, {})
    return folder


@torch.no_grad()
def logits(model, tokenizer) -> list[torch.Tensor]:
    out = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(model(input_ids=ids).logits.float())
    return out


@pytest.fixture
def run_dir(tmp_path, tiny_base) -> RunDir:
    rd = RunDir(tmp_path / "run")
    make_adapter(rd, tiny_base)
    return rd


def test_merge_matches_base_plus_adapter_and_saves_everything(run_dir, tiny_base, smollm2_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = make_config(run_dir.root, tiny_base, chat={"temperature": 0.3, "top_p": 0.85, "max_tokens": 700})
    out = run_dir.root / "merged"
    out.mkdir()
    result = merge.run(cfg, run_dir, out, UI())

    assert result["dtype"] == "float32" and result["qlora"] is False
    assert 0 <= result["max_logit_diff"] <= result["tolerance"] == 1e-3
    assert result["adapter_max_logit_change"] > 100 * result["max_logit_diff"]

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    base_logits = logits(base, smollm2_tokenizer)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tuned_logits = logits(tuned, smollm2_tokenizer)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    saved_logits = logits(saved, smollm2_tokenizer)
    for b, t, s in zip(base_logits, tuned_logits, saved_logits):
        assert float((s - t).abs().max()) <= 1e-3  # the saved model is base + adapter
        assert float((s - b).abs().max()) > 0.1  # and the adapter changed it
    assert float(max((s - t).abs().max() for s, t in zip(saved_logits, tuned_logits))) == pytest.approx(
        result["max_logit_diff"], abs=1e-4)

    assert list(out.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == smollm2_tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(out)
    eos = generation.eos_token_id
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    # transformers' generate() samples with the run config's chat settings, as the Modelfile and `medtune chat` do
    assert (generation.do_sample, generation.temperature, generation.top_p, generation.max_new_tokens) == (
        True, 0.3, 0.85, 700)


def test_merge_fails_above_tolerance(run_dir, tiny_base):
    cfg = make_config(run_dir.root, tiny_base, dtype="bfloat16", tolerance=1e-9)
    out = run_dir.root / "merged"
    out.mkdir()
    with pytest.raises(MedtuneError, match=r"differ from base \+ adapter by .* > merge.tolerance 1e-09 \(dtype "
                                           r"bfloat16\)"):
        merge.run(cfg, run_dir, out, UI())
    assert not any(out.iterdir())  # nothing saved


def test_qlora_adapter_merges_into_a_bf16_base(tmp_path, tiny_base):
    rd = RunDir(tmp_path / "run")
    make_adapter(rd, tiny_base, qlora=True)
    cfg = make_config(rd.root, tiny_base)
    assert merge.trained_with_qlora(cfg, rd)
    out = rd.root / "merged"
    out.mkdir()
    result = merge.run(cfg, rd, out, UI())
    assert result["qlora"] is True and result["dtype"] == "bfloat16"
    assert result["max_logit_diff"] <= result["tolerance"] == merge.TOLERANCE[torch.bfloat16]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_base_stored_quantized_is_refused(tmp_path, tiny_base):
    quantized = tmp_path / "bnb-4bit"
    shutil.copytree(tiny_base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MedtuneError, match="stored quantized \\(bitsandbytes\\).*unquantized"):
        merge.check_unquantized(str(quantized))
    merge.check_unquantized(str(tiny_base))


def test_a_base_whose_eos_is_not_its_end_of_turn_gets_a_chat_models_eos(tmp_path, tiny_base, smollm2_tokenizer):
    """A base model's tokenizer names its pre-training eos (<|endoftext|> here) while its chat turns end with
    <|im_end|>: the merged tokenizer's eos is <|im_end|> (what llama.cpp's converter writes as the GGUF's eos), and
    generation stops at both."""
    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    run = RunDir(tmp_path / "run")
    make_adapter(run, base)
    out = tmp_path / "run" / "merged"
    out.mkdir()
    merge.run(make_config(run.root, base), run, out, UI())
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(out).eos_token_id == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert {0, 2} <= set(stops)  # <|endoftext|> and <|im_end|>
