"""Bases built for FSDP without ever being whole in one place (bases larger than one machine's memory).

The model is made on the meta device (accelerate's `init_empty_weights`: shapes, no memory), LoRA is attached, the
base is sharded with FSDP2, `to_empty` gives each process memory for its own shard only, and `fill_` then writes
each shard: a process reads only its rows of every weight from the safetensors files (`safe_open(...).get_slice`).

QLoRA under FSDP follows the FSDP-QLoRA recipe of bitsandbytes, PEFT and accelerate: NF4 weights stored as bf16
(`quant_storage` = the compute dtype) so FSDP shards them like any other bf16 tensor. Each decoder `nn.Linear`
becomes a bitsandbytes `Linear4bit` whose weight is the packed 4-bit data, shape (in x out / 4, 1). The
quantization of a weight needs the whole weight (the block scales are themselves quantized against their mean), so
each process quantizes one weight at a time on its GPU and keeps its rows of the packed data plus the whole
quantization state (about 1/16 of the 4-bit data); bitsandbytes' `Linear4bit.forward` re-attaches that state to
the weight FSDP gathers for the layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from medtune.errors import MedtuneError
from medtune.train.parallel import BYTE_GATHER

NF4 = {"quant_type": "nf4", "compress_statistics": True, "blocksize": 64}  # QLoRA's defaults (double quantization)


class WeightSource(Protocol):
    """The base's weights by checkpoint name: some rows of one, or the whole of it."""

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def whole(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    """The `*.safetensors` files of an HF model folder, read lazily (memory-mapped slices)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.files = sorted(folder.glob("*.safetensors"))
        if not self.files:
            raise MedtuneError(f"{folder}: no *.safetensors files; train.strategy fsdp reads the base's weights from "
                               "safetensors (convert the checkpoint, or use strategy ddp)")
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(path, framework="pt") as fh:
                self.where.update((key, path) for key in fh.keys())  # noqa: SIM118 (safe_open has no __iter__)

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self.where:
            raise MedtuneError(f"the base's safetensors files have no weight {name!r} (files: "
                               f"{', '.join(p.name for p in self.files)}); is it the model the config describes?")
        return safe_open(self.where[name], framework="pt")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._open(name) as fh:
            return fh.get_slice(name)[start:stop]

    def whole(self, name: str) -> torch.Tensor:
        with self._open(name) as fh:
            return fh.get_tensor(name)


def model_folder(base: str, revision: str | None) -> Path:
    """A local folder with the base's config and safetensors (a hub id is fetched into the cache, weights included)."""
    path = Path(base)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base, revision=revision, allow_patterns=["*.json", "*.safetensors"]))


def decoder_layers(model: Any) -> Any:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise MedtuneError("train.strategy fsdp needs a decoder with `model.layers` (Llama, Qwen, Mistral, Gemma…)")
    return layers


def packed_rows(in_features: int, out_features: int, storage: torch.dtype) -> int:
    """Rows of the (rows, 1) tensor bitsandbytes packs a 4-bit weight into (two values a byte)."""
    return (in_features * out_features + 1) // (storage.itemsize * 2)


def four_bit_linears_(model: Any, dtype: torch.dtype) -> None:
    """Every `nn.Linear` of the decoder layers becomes a meta `Linear4bit` (NF4, stored as `dtype`), as transformers'
    BitsAndBytesConfig(load_in_4bit, bnb_4bit_quant_storage=dtype) would load it; the head stays as it is."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MedtuneError("train.qlora needs bitsandbytes: pip install bitsandbytes") from None
    for layer in decoder_layers(model):
        for name, child in list(layer.named_modules()):
            if type(child) is not torch.nn.Linear:
                continue
            four = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                     compute_dtype=dtype, compress_statistics=NF4["compress_statistics"],
                                     quant_type=NF4["quant_type"], quant_storage=dtype, device="meta")
            four.weight = bnb.nn.Params4bit(
                torch.empty(packed_rows(child.in_features, child.out_features, dtype), 1, dtype=dtype,
                            device="meta"), requires_grad=False, blocksize=NF4["blocksize"],
                compress_statistics=NF4["compress_statistics"], quant_type=NF4["quant_type"], quant_storage=dtype,
                module=four, bnb_quantized=True)
            if child.bias is not None:
                four.bias = child.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, four)
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap these layers with its 4-bit LoRA layers


def empty_model(config: Any, dtype: torch.dtype, attention: str, qlora: bool) -> Any:
    """The causal LM of `config` on the meta device (buffers, a few KB of rotary tables, stay real on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    extra = {} if attention == "auto" else {"attn_implementation": attention}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.tie_weights()  # made empty, a tied head is a tensor of its own until tied again
    if qlora:
        four_bit_linears_(model, dtype)
    return model


def checkpoint_name(module_name: str, param_name: str) -> str:
    """A parameter's name in the base's checkpoint: PEFT's wrapper prefix and `base_layer` hop removed."""
    name = f"{module_name}.{param_name}" if module_name else param_name
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _row_range(total: int, local: int, rank: int, world: int) -> tuple[int, int]:
    """The rows FSDP2's Shard(0) gives `rank` (torch.chunk: ceil(total / world) a process, the last ones short)."""
    if world == 1:
        return 0, total
    per = math.ceil(total / world)
    start = min(rank * per, total)
    stop = min(start + per, total)
    if stop - start != local:
        raise RuntimeError(f"shard of {total} rows on rank {rank} of {world}: expected {stop - start}, has {local}")
    return start, stop


def _frozen_tensors(model: Any) -> Iterable[tuple[str, Any, torch.nn.Parameter]]:
    """(checkpoint name, owning module, parameter) of each frozen parameter once (tied ones under their first name)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            yield checkpoint_name(module_name, param_name), module, param


@torch.no_grad()
def fill_(model: Any, source: WeightSource, rank: int = 0, world: int = 1) -> None:
    """Write the base's weights into `model` (a PEFT model on real, empty memory): each FSDP-sharded parameter gets
    only this process's rows; a 4-bit layer's weight is quantized here from the whole weight, one at a time."""
    for name, module, param in _frozen_tensors(model):
        local = param._local_tensor if hasattr(param, "_local_tensor") else param.data
        if name.endswith(BYTE_GATHER):  # not a weight of the base (train/parallel.py)
            local.zero_()
            continue
        if hasattr(module, "quant_state") and param is module.weight:  # a bitsandbytes Linear4bit
            import bitsandbytes as bnb

            whole = source.whole(name).to(local.device, torch.bfloat16 if local.dtype == torch.bfloat16
                                          else torch.float16)
            packed, state = bnb.functional.quantize_4bit(whole, quant_storage=local.dtype, **NF4)
            del whole
            module.quant_state = state  # whole on every process; Linear4bit.forward puts it on the gathered weight
            start, stop = _row_range(packed.shape[0], local.shape[0], rank, world)
            local.copy_(packed[start:stop])
            continue
        start, stop = _row_range(param.shape[0], local.shape[0], rank, world)
        rows = source.rows(name, start, stop)
        if tuple(rows.shape[1:]) != tuple(local.shape[1:]):
            raise MedtuneError(f"base weight {name}: the checkpoint's shape {tuple(rows.shape)} does not match the "
                               f"model's {tuple(param.shape)} (config and weights of different models?)")
        local.copy_(rows.to(local.dtype))


def to_empty_keeping_buffers(module: Any, device: torch.device) -> None:
    """`module.to_empty(device)`, the buffers (made real at construction: rotary tables) keeping their values."""
    buffers = {name: buffer.detach().to(device, copy=True) for name, buffer in module.named_buffers()
               if not buffer.is_meta}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            module.get_buffer(name).copy_(value)


def materialise_(loss_model: Any, model: Any, source: WeightSource, device: torch.device, rank: int,
                 world: int) -> None:
    """Memory for each process's shard (`to_empty`, through FSDP2's own handling of sharded parameters), then its
    weights from `source`; buffers (computed at construction, such as rotary tables) keep their values. LoRA's
    tensors come out empty: the caller initialises them."""
    to_empty_keeping_buffers(loss_model, device)
    causal = model.get_base_model()
    if getattr(causal.config, "tie_word_embeddings", False) and world == 1:
        causal.tie_weights()  # to_empty on unsharded tensors makes new parameters; FSDP's swaps keep them one
    fill_(causal, source, rank, world)
