"""The training loop's parts: the fused loss, batch counts, the batched Adafactor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.train.loss import IGNORE, CausalLMLoss, label_positions
from medtune.train.objectives.sft import collate, counts
from medtune.train.optim import Adafactor


def tiny_lora(tie: bool = True, on_head: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if on_head else [])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def random_rows(rng: np.random.Generator, n_rows: int, first_labelled: bool = False):
    rows = []
    for _ in range(n_rows):
        row = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(5, 30))
            mask = (rng.random(n) < 0.6).astype(np.uint8)
            mask[0] = first_labelled
            row.append((rng.integers(0, 300, n).astype(np.int32), mask))
        rows.append(row)
    return rows


def reference_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                             reduction="sum")


@pytest.mark.parametrize("on_head", [False, True], ids=["frozen-head-fused", "trained-head-chunked"])
def test_loss_and_gradients_equal_plain_cross_entropy(on_head):
    """The fused path (gradient formed in forward, small chunks) and the checkpointed path both equal full logits."""
    model = tiny_lora(on_head=on_head)
    assert (type(model.get_base_model().lm_head) is torch.nn.Linear) != on_head  # which path is under test
    batch = collate(random_rows(np.random.default_rng(0), 3), pad_id=0)
    inputs = [batch[k] for k in ("input_ids", "position_ids", "label_index", "targets")]
    loss = CausalLMLoss(model, chunk_tokens=7)(*inputs)  # several chunks and a ragged last one
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = reference_loss(model, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert ours and any(n for n in ours if "lora_A" in n)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(CausalLMLoss(model, chunk_tokens=5)(*inputs), expected, rtol=1e-5, atol=1e-5)


def test_counts_match_collate():
    rng = np.random.default_rng(1)
    for first in (False, True):
        rows = random_rows(rng, 4, first_labelled=first)
        batch = collate(rows, pad_id=0)
        real, labelled = counts(rows)
        assert labelled == int((batch["labels"] != IGNORE).sum()) == batch["targets"].numel()
        assert real == sum(len(ids) for row in rows for ids, _ in row)
        index, targets = label_positions(batch["labels"])
        assert torch.equal(batch["input_ids"].flatten()[index + 1], targets)  # label of t is token t+1
        # varlen attention's segments: every example, then each row's padding, in flat order
        width = batch["input_ids"].shape[1]
        segments = []
        for row in rows:
            lengths = [len(ids) for ids, _ in row]
            segments += lengths + ([width - sum(lengths)] if sum(lengths) < width else [])
        assert batch["cu_seq_lens"].dtype == torch.int32
        assert torch.diff(batch["cu_seq_lens"]).tolist() == segments
    wide = collate(random_rows(rng, 2), pad_id=0, width=200)
    assert wide["input_ids"].shape == (2, 200)  # packed rows padded to the packing length: one shape


def test_adafactor_matches_transformers():
    """The seed's optimizer (transformers' Adafactor with a fixed lr), batched per shape: same updates, same state."""
    from transformers.optimization import Adafactor as Reference

    torch.manual_seed(0)
    shapes = [(8, 64), (64, 8), (16, 8), (8, 64), (64, 8), (16, 8), (32,), (32,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Adafactor(ours, lr=1e-2, weight_decay=0.01)
    ref = Reference(theirs, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                    weight_decay=0.01)
    for step in range(12):
        grads = [torch.randn(s) * (1 + step) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # A checkpoint of transformers' optimizer continues here, and ours there.
    moved = Adafactor(ours, lr=1e-2, weight_decay=0.01)
    moved.load_state_dict(ref.state_dict())
    assert moved.state[ours[0]]["step"] == 12
    torch.testing.assert_close(moved.state[ours[0]]["exp_avg_sq_row"], ref.state[theirs[0]]["exp_avg_sq_row"])
    Reference(theirs, lr=1e-2, scale_parameter=False, relative_step=False).load_state_dict(opt.state_dict())


def test_a_base_made_empty_and_filled_from_its_files_equals_the_loaded_one(tiny_base):
    """The FSDP build path without the processes: meta model, LoRA, memory, weights read row by row from the
    safetensors files (tied head and rotary buffers included) give the model from_pretrained loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.train.sharded import SafetensorsSource, empty_model, fill_

    loaded = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    made = empty_model(AutoConfig.from_pretrained(tiny_base), torch.float32, "auto", qlora=False)
    assert all(p.is_meta for p in made.parameters())
    made.to_empty(device="cpu")
    made.model.rotary_emb.inv_freq.copy_(loaded.model.rotary_emb.inv_freq)  # materialise_ keeps buffers so
    made.tie_weights()
    made.requires_grad_(False)  # the base is frozen (LoRA's tensors, the trainable ones, are not read)
    fill_(made, SafetensorsSource(tiny_base))
    theirs = loaded.state_dict()
    mine = made.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    assert made.lm_head.weight is made.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    assert torch.equal(made(ids).logits, loaded(ids).logits)


def test_rows_of_a_shard_follow_fsdp_chunks():
    from medtune.train.sharded import _row_range, packed_rows

    assert [_row_range(10, n, r, 3) for r, n in enumerate((4, 4, 2))] == [(0, 4), (4, 8), (8, 10)]
    assert _row_range(10, 10, 0, 1) == (0, 10)
    with pytest.raises(RuntimeError):
        _row_range(10, 3, 0, 3)
    assert packed_rows(8192, 28672, torch.bfloat16) == 8192 * 28672 // 4  # two 4-bit values a byte, 2 bytes a row


def test_four_bit_base_filled_per_weight_matches_transformers_qlora_loader(tiny_base):
    """train/sharded.py's QLoRA layout (NF4, double quantization, stored as bf16) is bit for bit what transformers'
    BitsAndBytesConfig(bnb_4bit_quant_storage=bf16) loads, and computes the same logits (bitsandbytes' CPU kernels)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from medtune.train.sharded import SafetensorsSource, empty_model, fill_, to_empty_keeping_buffers

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant, dtype=torch.bfloat16,
                                                      device_map={"": "cpu"})
    except Exception as exc:  # a bitsandbytes build without CPU 4-bit support
        pytest.skip(f"transformers cannot load 4-bit on this CPU: {exc}")
    mine = empty_model(AutoConfig.from_pretrained(tiny_base), torch.bfloat16, "auto", qlora=True)
    to_empty_keeping_buffers(mine, torch.device("cpu"))
    mine.tie_weights()
    mine.requires_grad_(False)
    fill_(mine, SafetensorsSource(tiny_base))
    four = [(n, m) for n, m in mine.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four) == 2 * 7
    for name, module in four:
        other = theirs.get_submodule(name)
        assert torch.equal(module.weight.data.view(torch.int16), other.weight.data.view(torch.int16)), name
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.allclose(mine(ids).logits.float(), theirs(ids).logits.float(), atol=1e-2)


def test_a_layer_with_4bit_weights_is_gathered_as_bytes(tmp_path):
    """FSDP2 gathers a layer whose parameters share one float dtype through a float copy, which on a GPU rewrites
    every NaN bit pattern (bitsandbytes issue #1945; measured on H200s: ~0.08% of a packed NF4 weight changed). NF4
    data stored as bf16 holds such patterns, so shard() gives a layer with 4-bit weights a parameter of another
    dtype: FSDP2 then gathers it as bytes. A layer without 4-bit weights keeps its dtype's gather."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_all_gather_input_metadatas

    from medtune.train.parallel import BYTE_GATHER, shard

    class FourBit(torch.nn.Linear):  # what shard() recognises bitsandbytes' Linear4bit by
        quant_state = None

    class Layer(torch.nn.Module):
        def __init__(self, four_bit: bool) -> None:
            super().__init__()
            self.proj = (FourBit if four_bit else torch.nn.Linear)(8, 8, bias=False, dtype=torch.bfloat16)
            self.norm = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16), requires_grad=False)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(True), Layer(False)])

    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Decoder()

    class Peft(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = Base()

        def get_base_model(self):
            return self.base

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Peft()

    loss_model = Loss()
    loss_model.requires_grad_(False)
    # NaN bit patterns with payloads, as packed 4-bit data has them (-0x3D is 0xFFC3)
    nan_bits = torch.tensor([0x7F81, -0x3D, 0x7FA5, 0x0102] * 16, dtype=torch.int16).view(torch.bfloat16)
    with torch.no_grad():
        loss_model.model.base.model.layers[0].proj.weight.copy_(nan_bits.view(8, 8))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard(loss_model, [], torch.device("cpu"), 1)
        four, plain = loss_model.model.base.model.layers
        assert hasattr(four, BYTE_GATHER) and not hasattr(plain, BYTE_GATHER)
        assert getattr(four, BYTE_GATHER).dtype != torch.bfloat16 and not getattr(four, BYTE_GATHER).requires_grad
        loss_model._get_fsdp_state()._lazy_init()  # what the first forward does
        gather_dtypes = []
        for layer in (four, plain):
            params = layer._get_fsdp_state()._fsdp_param_group.fsdp_params
            gather_dtypes.append(_get_all_gather_input_metadatas([p.all_gather_inputs for p in params])[2])
        assert gather_dtypes == [torch.uint8, torch.bfloat16]
        four.unshard()
        assert torch.equal(four.proj.weight.detach().view(torch.int16), nan_bits.view(torch.int16).view(8, 8))
        four.reshard()
    finally:
        dist.destroy_process_group()
