"""A chat template by config, Gemma's turns in the Ollama Modelfile, `pkg:<package>` bases joined by assemble(), and
fp16 refused for models that overflow in it."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import yaml

from medtune import chat_formats, chat_templates
from medtune.config import ChatConfig, load_config
from medtune.errors import MedtuneError


def _config(tmp_path, template):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    raw = {"name": "t", "run_dir": "run", "base": {"model": "owner/name", "chat_template": template},
           "data": {"path": "d.jsonl"}, "export": {"name": "t"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_named_templates_and_jinja_files_resolve(tmp_path):
    assert load_config(_config(tmp_path, "gemma")).base.chat_template == "gemma"
    (tmp_path / "mine.jinja").write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    cfg = load_config(_config(tmp_path, "./mine.jinja"))
    assert cfg.base.chat_template == str(tmp_path / "mine.jinja")
    with pytest.raises(MedtuneError, match="not a named template"):
        load_config(_config(tmp_path, "gemmma"))
    with pytest.raises(MedtuneError, match="Jinja file not found"):
        load_config(_config(tmp_path, "./missing.jinja"))


def test_a_template_needs_its_tokens_in_the_vocabulary(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    chat_templates.apply(tokenizer, "chatml")
    assert tokenizer.chat_template == chat_formats.CHATML
    with pytest.raises(MedtuneError, match="has no token '<start_of_turn>'"):
        chat_templates.apply(tokenizer, "gemma")


@pytest.fixture(scope="module")
def gemma_turns_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with Gemma's turn tokens added and Gemma's template (no Gemma package needed)."""
    from medtune.models import end_of_turn_token

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    chat_templates.apply(tokenizer, "gemma")
    assert end_of_turn_token(tokenizer) == "<end_of_turn>"  # the template's, not the vocabulary's <|im_end|>
    return tokenizer


def test_gemma_template_folds_the_system_text_into_the_first_user_turn(gemma_turns_tokenizer):
    text = gemma_turns_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        tokenize=False, add_generation_prompt=True)
    bos = gemma_turns_tokenizer.bos_token or ""
    assert text == (f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello"
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_ollama_modelfile_carries_gemmas_turns_and_stops(gemma_turns_tokenizer):
    from medtune.export import gotemplate, ollama

    text, checked = ollama.modelfile(gemma_turns_tokenizer, "m-Q4_K_M.gguf", "m", ChatConfig())
    assert checked["format"] == "gemma" and checked["probe_conversations"] == len(ollama.PROBES)
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'PARAMETER stop "<start_of_turn>"' in text
    template = ollama.template_of(text)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert gotemplate.render(template, ollama.ollama_values(messages)) == \
        "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"


def test_a_package_that_ships_parts_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    from medtune.models import package_file

    package = tmp_path / "site" / "parts_demo_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\nMODEL_NAME = 'demo.gguf'\nCALLS = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    CALLS.append(output_path)\n    Path(output_path).write_bytes(b'GGUF-joined')\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    path = package_file("pkg:parts_demo_pkg")
    assert path == tmp_path / "cache" / "packages" / "parts_demo_pkg" / "demo.gguf"
    assert path.read_bytes() == b"GGUF-joined" and not list(path.parent.glob("*.partial"))
    assert package_file("pkg:parts_demo_pkg") == path
    assert len(sys.modules["parts_demo_pkg"].CALLS) == 1
    with pytest.raises(MedtuneError, match="is not installed"):
        package_file("pkg:no_such_parts_pkg")


def test_fp16_is_refused_for_a_model_that_overflows_in_it(tmp_path):
    from transformers import Gemma3TextConfig

    from medtune.config import Config
    from medtune.merge.stage import merge_dtype
    from medtune.train.setup import pick_precision

    with pytest.raises(MedtuneError, match="gemma3_text models overflow in float16"):
        pick_precision("fp16", torch.device("cuda"), "gemma3_text")
    assert pick_precision("auto", torch.device("cpu"), "gemma3_text") == "fp32"
    Gemma3TextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, dtype="float16").save_pretrained(tmp_path)
    raw = {"name": "t", "run_dir": str(tmp_path), "base": {"model": str(tmp_path)},
           "data": {"path": "x"}, "export": {"name": "t"}}
    with pytest.raises(MedtuneError, match="merge.dtype float16"):
        merge_dtype(Config.model_validate({**raw, "merge": {"dtype": "float16"}}), str(tmp_path))
    assert merge_dtype(Config.model_validate(raw), str(tmp_path)) == torch.bfloat16  # a float16 checkpoint
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3_text"


def test_trainable_tokens_train_and_merge_the_marker_rows(tiny_config):
    """train.lora.trainable_tokens: the rows of those tokens in the (tied) embedding train and merge; others stay."""
    from safetensors.torch import load_file

    from medtune.artifacts import RunDir
    from medtune.pipeline import BY_NAME, run_stage
    from medtune.ui import UI

    cfg = load_config(tiny_config, ["train.lora.trainable_tokens=[<|im_end|>]", "train.lr=5e-2"])
    run = RunDir(cfg.run_dir)
    for name in ("data", "train", "merge"):
        run_stage(BY_NAME[name], cfg, run, UI())
    base = load_file(next(__import__("pathlib").Path(cfg.base.model).glob("*.safetensors")))
    merged = load_file(next((run / "merged").glob("*.safetensors")))
    key = next(k for k in merged if k.endswith("embed_tokens.weight"))
    eot = 2  # <|im_end|> in SmolLM2's vocabulary
    changed = (merged[key] - base[key]).abs().amax(dim=1)
    assert changed[eot] > 0 and changed.count_nonzero() == 1
    with pytest.raises(MedtuneError, match="not a token"):
        from medtune.train.setup import apply_lora

        apply_lora(None, load_config(tiny_config, ["train.lora.trainable_tokens=[<nope>]"]), UI(), cfg.base.model)


def test_a_trainable_token_row_can_start_as_another_tokens_row(tiny_config):
    """train.lora.trainable_tokens_from: <|im_end|>'s row starts as <|endoftext|>'s, in the embedding and the tied
    head, and merges so; the other trainable row starts as itself. Misnamed tokens and FSDP are refused."""
    from transformers import AutoModelForCausalLM

    from medtune.train.setup import apply_lora, empty_base_for_sharding
    from medtune.ui import UI

    eos, bos, eot = 0, 1, 2  # <|endoftext|>, <|im_start|>, <|im_end|> in SmolLM2's vocabulary
    cfg = load_config(tiny_config, ["train.lora.trainable_tokens=[<|im_start|>,<|im_end|>]",
                                    "train.lora.trainable_tokens_from={<|im_end|>: <|endoftext|>}"])
    base = AutoModelForCausalLM.from_pretrained(cfg.base.model)
    original = base.get_input_embeddings().weight.detach().clone()
    assert not torch.equal(original[eot], original[eos])
    model = apply_lora(base, cfg, UI(), cfg.base.model)
    with torch.no_grad():
        ids = torch.tensor([[eos, bos, eot]])
        embedded = model.get_input_embeddings()(ids)[0]
    assert torch.equal(embedded[2], original[eos]) and torch.equal(embedded[1], original[bos])
    merged = model.merge_and_unload()
    weight = merged.get_input_embeddings().weight
    assert torch.equal(weight[eot], original[eos]) and torch.equal(weight[bos], original[bos])
    assert merged.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied: the head row too
    changed = (weight - original).abs().amax(dim=1)
    assert changed.count_nonzero() == 1

    with pytest.raises(MedtuneError, match="not in train.lora.trainable_tokens"):
        load_config(tiny_config, ["train.lora.trainable_tokens_from={<|im_end|>: <|endoftext|>}"])
    with pytest.raises(MedtuneError, match="'<nope>' is not a token"):
        apply_lora(None, load_config(tiny_config, ["train.lora.trainable_tokens=[<|im_end|>]",
                                                   "train.lora.trainable_tokens_from={<|im_end|>: <nope>}"]),
                   UI(), cfg.base.model)
    with pytest.raises(MedtuneError, match="trainable_tokens does not combine with train.strategy fsdp"):
        empty_base_for_sharding(load_config(tiny_config, ["train.lora.trainable_tokens=[<|im_end|>]",
                                                          "train.strategy=fsdp"]), cfg.base.model, "fp32",
                                torch.device("cpu"))
