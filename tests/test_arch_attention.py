"""Every training attention path honours Gemma 3's sliding window, packed and unpacked, against transformers' eager
attention on each example alone (a tiny Gemma 3 with random weights: head_dim != hidden / heads, a window of 4)."""

from __future__ import annotations

import pytest
import torch

WINDOW = 4
LENGTHS = (13, 7, 12)  # packed into one row: each example longer or shorter than the window
BF16_TOLERANCE = 0.1  # bf16 on the GPU against fp32 eager (bf16 eager on a CPU: 0.033)


def _gemma(attention: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=WINDOW, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], attn_implementation=attention,
    )
    model = Gemma3ForCausalLM(config).eval()
    for p in model.parameters():  # random weights large enough that every position's attention matters
        torch.nn.init.normal_(p, std=0.2)
    return model.to(device=device, dtype=dtype)


def _examples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=generator) for n in LENGTHS]


@torch.no_grad()
def _alone(model, examples: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model.model(input_ids=ex[None], position_ids=torch.arange(len(ex), device=ex.device)[None], use_cache=False)
            .last_hidden_state[0].float() for ex in examples]


@torch.no_grad()
def _packed(model, examples: list[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    """The examples in one row, positions restarting at 0 (as the data stage packs them), as the loss calls it."""
    from medtune.train.attention import NAME, cu_seq_lens

    ids = torch.cat(examples)[None].to(device)
    positions = torch.cat([torch.arange(len(ex)) for ex in examples])[None]
    extra = {"cu_seq_lens": cu_seq_lens(positions).to(device)} if model.config._attn_implementation == NAME else {}
    hidden = model.model(input_ids=ids, position_ids=positions.to(device), use_cache=False, **extra)
    out, start = [], 0
    for ex in examples:
        out.append(hidden.last_hidden_state[0, start:start + len(ex)].float().cpu())
        start += len(ex)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    return _alone(_gemma("eager"), _examples())


def test_the_window_matters(reference):
    """Without its window the same model gives other hidden states, far beyond the bf16 tolerance (3.8): the
    comparisons below can fail."""
    wide = _gemma("eager")
    wide.config.sliding_window = 10_000
    for layer in wide.model.layers:
        layer.self_attn.sliding_window = 10_000
    assert _max_diff(_alone(wide, _examples()), reference) > 10 * BF16_TOLERANCE


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cpu_paths_packed_and_unpacked(attention, reference):
    model = _gemma(attention)
    assert _max_diff(_alone(model, _examples()), reference) < 1e-4
    assert _max_diff(_packed(model, _examples()), reference) < 1e-4


def test_flex_attention_on_cpu(reference):
    """flex_attention's block mask (built by transformers from the packed positions) carries the window too."""
    model = _gemma("flex_attention")
    try:
        packed = _packed(model, _examples())
    except Exception as exc:  # noqa: BLE001 - a CPU without a compiler for flex_attention's kernel
        pytest.skip(f"flex_attention does not run on this CPU: {str(exc).splitlines()[0][:120]}")
    assert _max_diff(packed, reference) < 1e-3
    assert _max_diff(_alone(model, _examples()), reference) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's varlen (FlashAttention) kernel is CUDA-only")
@pytest.mark.parametrize("attention", ["varlen", "flex_attention", "sdpa"])
def test_gpu_paths_packed(attention, reference):
    from medtune.train.attention import register

    register()
    model = _gemma(attention, torch.bfloat16, "cuda")
    packed = _max_diff(_packed(model, _examples(), "cuda"), reference)
    print(f"{attention} packed: max |diff| {packed:.4f} (bf16 against fp32 eager)")
    assert packed < BF16_TOLERANCE
    if attention != "varlen":  # varlen needs the flat starts of a packed batch
        examples = [ex.cuda() for ex in _examples()]
        alone = _max_diff([h.cpu() for h in _alone(model, examples)], reference)
        print(f"{attention} unpacked: max |diff| {alone:.4f}")
        assert alone < BF16_TOLERANCE


def test_varlen_refuses_soft_capping():
    from medtune.errors import MedtuneError
    from medtune.train.attention import varlen_attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(MedtuneError, match="soft-caps"):
        varlen_attention(None, q, q, q, None, cu_seq_lens=torch.tensor([0, 4], dtype=torch.int32), softcap=50.0)
