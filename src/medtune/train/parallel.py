"""Training on several processes (torchrun): data parallel, with the frozen base replicated (ddp) or sharded (fsdp).

LoRA's trainable tensors are a few million numbers (3.4 M for Llama-3.2-1B q/k/v/o at r 8: 14 MB of fp32
gradients), so they stay whole on every process and their gradients are summed with one flat all-reduce per
optimizer step, after the last micro-batch's backward. That is all DistributedDataParallel would do for them; its
bucketing and overlap exist for gradients a thousand times larger. The optimizer, checkpoints and the saved adapter
are then the same code as on one process.

`fsdp` additionally shards the frozen base over the processes with FSDP2 (`fully_shard` per decoder layer and on
the loss module as root, the LoRA tensors left out through `ignored_params`): each process holds 1/N of the
base's weights and gathers one layer at a time, for bases too large for one card. The base is then made on the meta
device and each process reads only its shard (train/sharded.py), so no machine ever holds the whole model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from medtune.errors import MedtuneError


class Distributed:
    """The process's place in a torchrun launch (world 1 when launched alone)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():  # each process its own GPU, named to NCCL up front
                device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(device)
                torch.distributed.init_process_group("nccl", device_id=device)
            else:
                torch.distributed.init_process_group("gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes (queued on the GPU stream; the host does not wait)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's `obj`, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def everyone(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's values of the trainable tensors on every process."""
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        with torch.no_grad():
            flat = _flatten_dense_tensors([p.data for p in params])
            torch.distributed.broadcast(flat, src=0)
            torch._foreach_copy_([p.data for p in params], list(_unflatten_dense_tensors(flat, params)))

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of the (replicated) trainable tensors over processes in one collective."""
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = self.sum_(_flatten_dense_tensors(grads))
        torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))


# FSDP2 gathers a layer whose parameters share one float dtype through a float copy that rewrites every NaN bit
# pattern to one canonical NaN (measured on an H200: ~0.08% of a 4-bit weight's elements changed; bitsandbytes
# issue #1945). NF4 data stored as bf16 is not bf16 numbers and holds such patterns, so a layer with 4-bit weights
# gets a one-element frozen parameter of another float dtype (FSDP2 makes every parameter able to require
# gradients, so not an integer one): a layer of mixed dtypes is gathered as bytes, bit for bit.
BYTE_GATHER = "fsdp_byte_gather"


def shard(loss_model: Any, trainable: list[torch.nn.Parameter], device: torch.device, world: int) -> None:
    """FSDP2 over the frozen base of `loss_model` (a CausalLMLoss around a PEFT model), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(loss_model.model.get_base_model(), "model", None), "layers", None)
    if layers is None:
        raise MedtuneError("train.strategy fsdp needs a decoder with `model.layers` (Llama, Qwen, Mistral, Gemma…)")
    for p in trainable:  # left out of sharding: moved here, kept whole on every process (meta: given memory later)
        if not p.is_meta:
            p.data = p.data.to(device)
    for module in loss_model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    mesh = init_device_mesh(device.type, (world,))
    ignored = set(trainable)
    for layer in layers:
        if any(hasattr(module, "quant_state") for module in layer.modules()):  # bitsandbytes' 4-bit layers
            first = next(layer.parameters())
            other = torch.float16 if first.dtype != torch.float16 else torch.float32
            layer.register_parameter(BYTE_GATHER, torch.nn.Parameter(
                torch.zeros(world, dtype=other, device=first.device), requires_grad=False))
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(loss_model, mesh=mesh, ignored_params=ignored)
