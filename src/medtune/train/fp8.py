"""The frozen base in FP8 (`train.base_precision: fp8`): every linear weight of the decoder layers (attention and MLP
projections; embeddings, head and norms stay as loaded) is quantized once, at load, to float8 e4m3 with one scale
per output row, and the forward and input-gradient matrix multiplies run on the GPU's FP8 units
(`torch._scaled_mm` with row-wise scales: twice the bf16 rate on Hopper).

Activations are scaled per row (token) at each call: x ~ s_x * q_x with q_x in e4m3. The forward is
y = (s_x q_x) @ (q_w s_w)^T, a row-wise scaled FP8 matrix multiply with a bf16 result. The weight never changes,
so it keeps no amax history and has no gradient; only d(input) is computed:
dx = dy @ W = (dy * s_w) @ q_w. The weight's row scales lie on the reduced dimension there, so they are folded into
the output gradient before it is quantized per row (exact: a row scale times a column is the same product), and
the FP8 weight is read transposed (FP8 tensor cores take the reduced dimension contiguous in both operands).
Gradients are quantized to e4m3 as well: with a scale per row the range is the row's own, and e4m3's extra
mantissa bit halves the rounding error of e5m2 (tests/test_fp8.py measures both; bench/train_shapes.py on the GPU).

The FP8 weight is stored as uint8 bytes and viewed as float8 where it is used: PEFT moves a LoRA adapter to its base
layer's floating dtype (it would make the adapter FP8), and `module.to(dtype)` casts floating tensors only. LoRA's
own weights, gradients and optimizer stay as without fp8 (fp32 under bf16). The FP8 copy is never saved: the adapter
is a plain PEFT LoRA adapter and merges into the original base as any other.

On a CPU (tests) the same arithmetic runs through an emulation of the scaled matrix multiply: FP8 values widened to
fp32, scaled, multiplied, rounded to bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from medtune.errors import MedtuneError

WEIGHT_DTYPE = torch.float8_e4m3fn
ACTIVATION_DTYPE = torch.float8_e4m3fn
GRADIENT_DTYPE = torch.float8_e4m3fn  # row scales give each row its own range; e4m3 rounds half as coarsely as e5m2
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ALIGN = 16  # FP8 matrix multiplies need both dimensions of a weight to be multiples of 16
SCALE_FLOOR = 1e-12  # an all-zero row gets this scale (its values quantize to 0), never a division by 0


def unsupported_reason(device: torch.device) -> str | None:
    """Why `device` cannot run FP8 matrix multiplies, or None when it can."""
    if device.type != "cuda":
        return f"this {device.type} has no FP8 matrix multiplies"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is compute capability {major}.{minor}; FP8 matrix multiplies "
                f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper: L4, L40S, H100, H200)")
    return None


def require_support(device: torch.device, precision: str | None = None) -> None:
    """One line, before any weight is loaded, where `train.base_precision: fp8` cannot run on `device` (or in the
    training precision, once known)."""
    reason = unsupported_reason(device)
    if reason:
        raise MedtuneError(f"train.base_precision fp8: {reason}; use train.base_precision bf16 (the default; "
                           "train.qlora shrinks the base further on a GPU)")
    if precision is not None and precision != "bf16":
        raise MedtuneError(f"train.base_precision fp8 computes in bf16, but train.precision resolves to {precision}; "
                           "set train.precision bf16 (or auto)")


def quantize_rows(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (..., n) as FP8 values and one fp32 scale per row (..., 1): t ~ q * scale, the row's largest magnitude
    mapped to the format's largest value."""
    top = torch.finfo(dtype).max
    wide = t.float()
    scale = wide.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR) / top
    # clamped: the division may round just past the largest value, and PyTorch's cast to e4m3fn makes that NaN
    return (wide / scale).clamp(-top, top).to(dtype), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """(scale_a * a) @ (b * scale_b) in bf16: a (m, k) FP8 row-major with scale_a (m, 1), b (k, n) FP8
    column-major with scale_b (1, n). The GPU's FP8 matrix multiply, or its emulation on a CPU."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(torch.bfloat16)


class _Fp8Matmul(torch.autograd.Function):
    """x @ W^T for a frozen FP8 weight W = q_w * s_w (row scales); returns d(x) only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        q, scale = quantize_rows(rows, ACTIVATION_DTYPE)
        out = scaled_mm(q, weight.t(), scale, weight_scale)
        ctx.save_for_backward(weight, weight_scale)
        ctx.input_dtype = x.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, weight_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).float() * weight_scale  # s_w folded in: dy @ W = (dy * s_w) @ q_w
        q, scale = quantize_rows(rows, GRADIENT_DTYPE)
        # (n, k) column-major: the reduced dimension n contiguous, as FP8 tensor cores need
        weight_t = weight.t().contiguous().t()
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        dx = scaled_mm(q, weight_t, scale, ones)
        return dx.reshape(*grad.shape[:-1], weight.shape[1]).to(ctx.input_dtype), None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is FP8 e4m3 with a scale per output row (see the module docstring).

    An `nn.Linear` to PEFT, which wraps it with its ordinary LoRA layer. `weight` holds the FP8 bytes (uint8, so no
    dtype cast can reinterpret them), `weight_scale` the (1, out_features) fp32 row scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8, device=device),
                                         requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                           requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear) -> Fp8Linear:
        """The FP8 copy of `linear`'s weight (its bias, if any, kept as it is), on `linear`'s device."""
        weight = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=False, device=weight.device)
        q, scale = quantize_rows(weight, WEIGHT_DTYPE)
        out.weight.data = q.view(torch.uint8)
        out.weight_scale.copy_(scale.t())
        if linear.bias is not None:
            out.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    @property
    def fp8_weight(self) -> torch.Tensor:
        return self.weight.view(WEIGHT_DTYPE)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in fp32 (out_features, in_features)."""
        return dequantize_rows(self.fp8_weight, self.weight_scale.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Matmul.apply(x, self.fp8_weight, self.weight_scale)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "weight=float8_e4m3fn with row scales")


def convertible(module: torch.nn.Module) -> bool:
    """A plain linear layer whose shape FP8 matrix multiplies accept."""
    return type(module) is torch.nn.Linear and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


@torch.no_grad()
def quantize_base_(model: Any) -> dict[str, int]:
    """Every plain linear layer of `model`'s decoder layers becomes an `Fp8Linear`, one weight at a time (the bf16
    weight is released as its FP8 copy is made). Returns how many were converted and how many were kept (a shape
    FP8 matrix multiplies do not take)."""
    from medtune.train.sharded import decoder_layers

    converted = kept = 0
    for layer in decoder_layers(model):
        for name, child in list(layer.named_modules()):
            if type(child) is not torch.nn.Linear:
                continue
            if not convertible(child):
                kept += 1
                continue
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, Fp8Linear.from_linear(child))
            converted += 1
    if not converted:
        raise MedtuneError("train.base_precision fp8: this model's decoder layers have no linear layer whose shape "
                           f"FP8 matrix multiplies take (both sizes multiples of {ALIGN}); use base_precision bf16")
    return {"converted": converted, "kept_bf16": kept}
