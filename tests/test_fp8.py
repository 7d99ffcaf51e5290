"""The frozen base in FP8 (train/fp8.py) on a CPU: scales, the layer's arithmetic (the GPU's scaled matrix multiply
emulated), PEFT's LoRA around it, the adapter merged into the original base, the refusals and the memory estimate.
The FP8 kernel itself runs in bench/train_shapes.py on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.train import fp8

ROOT = Path(__file__).resolve().parents[1]
E4M3_MAX = 448.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def tiny_llama(seed: int = 0, hidden: int = 64, ffn: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_row_scales_round_trip_within_e4m3_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-4, 2, 64)[:, None]  # rows six decades apart
    w[5] = 0.0
    q, scale = fp8.quantize_rows(w, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = fp8.dequantize_rows(q, scale)
    assert torch.isfinite(back).all() and (back[5] == 0).all()
    # each row's largest magnitude lands on e4m3's largest value
    nonzero = torch.arange(64) != 5
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((63,), E4M3_MAX))
    # 3 mantissa bits: half a step is 1/16 of a normal value; subnormals are spaced 2^-9 (in units of the scale)
    bound = w.abs() / 16 + scale * 2**-10 + 1e-30
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    assert rel(back, w) < 0.03


def test_values_at_the_edge_of_the_range_saturate_instead_of_becoming_nan():
    w = torch.tensor([[1.0, -1.0, 0.999999, 1e-30], [3.0e38, -3.0e38, 1.0, 0.0]])
    q, scale = fp8.quantize_rows(w, torch.float8_e4m3fn)
    assert not torch.isnan(q.float()).any()
    assert torch.allclose(fp8.dequantize_rows(q, scale)[:, :2], w[:, :2], rtol=1e-6)


def test_e4m3_gradients_round_finer_than_e5m2_under_row_scales():
    torch.manual_seed(1)
    grad = torch.randn(256, 512) * torch.logspace(-3, 1, 256)[:, None]
    grad[:, :4] *= 50  # a few outlier columns, as output gradients have
    errors = {}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, scale = fp8.quantize_rows(grad, dtype)
        errors[dtype] = rel(fp8.dequantize_rows(q, scale), grad)
    assert errors[torch.float8_e4m3fn] < 0.6 * errors[torch.float8_e5m2]
    assert fp8.GRADIENT_DTYPE == torch.float8_e4m3fn


def test_fp8_linear_forward_and_input_gradient_are_the_quantized_arithmetic():
    torch.manual_seed(2)
    linear = torch.nn.Linear(128, 64, bias=False)
    layer = fp8.Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight_scale.shape == (1, 64)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 64) and y.dtype == x.dtype
    q, s = fp8.quantize_rows(x.detach().reshape(-1, 128), fp8.ACTIVATION_DTYPE)
    emulated = (fp8.dequantize_rows(q, s) @ layer.dequantized_weight().t()).to(torch.bfloat16).float()
    assert rel(y.reshape(-1, 64), emulated) < 1e-6
    assert rel(y, x.detach() @ linear.weight.detach().t()) < 0.06  # what quantizing weights and inputs costs

    dy = torch.randn(3, 5, 64)
    y.backward(dy)
    g = dy.reshape(-1, 64) * layer.weight_scale
    gq, gs = fp8.quantize_rows(g, fp8.GRADIENT_DTYPE)
    expected = (fp8.dequantize_rows(gq, gs) @ layer.fp8_weight.float()).to(torch.bfloat16).float()
    assert rel(x.grad.reshape(-1, 128), expected) < 1e-6
    assert rel(x.grad, dy @ linear.weight.detach()) < 0.06
    assert layer.weight.grad is None


def test_bias_is_kept_and_added():
    torch.manual_seed(3)
    linear = torch.nn.Linear(32, 16, bias=True)
    layer = fp8.Fp8Linear.from_linear(linear)
    x = torch.randn(4, 32)
    assert rel(layer(x), linear(x).detach()) < 0.06
    assert torch.equal(layer.bias, linear.bias)


def test_quantize_base_converts_the_decoder_linears_only():
    model = tiny_llama()
    kept = torch.nn.Linear(64, 40, bias=False)  # 40 is no multiple of 16: FP8 matmuls refuse it
    model.model.layers[0].mlp.extra = kept
    done = fp8.quantize_base_(model)
    assert done == {"converted": 14, "kept_bf16": 1}
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, name), fp8.Fp8Linear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(layer.mlp, name), fp8.Fp8Linear)
    assert type(model.model.layers[0].mlp.extra) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head untouched


def test_peft_wraps_the_fp8_layers_with_its_ordinary_lora():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    model = tiny_llama()
    fp8.quantize_base_(model)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 6 and all(isinstance(m.get_base_layer(), fp8.Fp8Linear) for m in wrapped)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}  # not cast to the base's storage
    ids = torch.randint(1, 96, (2, 12))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in trainable.items() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def train_lora_over_fp8(model, steps: int = 3):
    from peft import LoraConfig, get_peft_model

    fp8.quantize_base_(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(4)
    ids = torch.randint(1, 96, (4, 16))
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model, ids


def test_an_adapter_trained_over_the_fp8_base_merges_into_the_original_base(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    original = tiny_llama(seed=5)
    original.save_pretrained(tmp_path / "base")
    tuned, ids = train_lora_over_fp8(tiny_llama(seed=5))
    trained = {n: p.detach().clone() for n, p in tuned.named_parameters() if "lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)
    tuned.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k and v.dtype == torch.float32 for k, v in saved.items())  # no FP8 copy
    with torch.no_grad():
        fp8_logits = tuned(input_ids=ids).logits

    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    attached = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for name, p in attached.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name]), name
    q = attached.base_model.model.model.layers[0].self_attn.q_proj
    delta = q.get_delta_weight("default")
    merged = attached.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert torch.allclose(layer.weight, original.model.layers[0].self_attn.q_proj.weight + delta, atol=1e-6)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert rel(merged_logits, fp8_logits) < 0.05  # the full-precision base computes what the FP8 one approximated


def test_fp8_is_refused_on_a_cpu_and_before_hopper(monkeypatch):
    with pytest.raises(MedtuneError, match=r"train\.base_precision fp8: this cpu has no FP8 .*base_precision bf16"):
        fp8.require_support(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(MedtuneError, match=r"A100.* compute capability 8\.0.*8\.9 or newer.*base_precision bf16"):
        fp8.require_support(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.require_support(torch.device("cuda", 0), "bf16")
    with pytest.raises(MedtuneError, match="computes in bf16"):
        fp8.require_support(torch.device("cuda", 0), "fp16")


def test_the_train_stage_refuses_fp8_on_a_cpu_before_the_base_is_resolved(monkeypatch):
    from medtune.train import setup

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was resolved before the refusal")

    monkeypatch.setattr(setup, "resolve_base", no_loading)
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.base_precision=fp8", "train.device=cpu"])
    with pytest.raises(MedtuneError, match=r"train\.base_precision fp8: this cpu"):
        setup.placement(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["train.qlora=true"], "fp8 and train.qlora do not combine"),
    (["train.precision=fp16"], "computes in bf16: set train.precision bf16 or auto"),
    (["train.lora.dora=true"], "does not combine with train.lora.dora"),
    (["train.strategy=fsdp"], "does not combine with train.strategy fsdp"),
])
def test_config_refuses_what_fp8_does_not_combine_with(overrides, message):
    with pytest.raises(MedtuneError, match=message) as err:
        load_config(ROOT / "configs" / "demo.yaml", ["train.base_precision=fp8", *overrides])
    assert "\n" not in str(err.value)
    assert load_config(ROOT / "configs" / "demo.yaml").train.base_precision == "bf16"
    with pytest.raises(MedtuneError, match="base_precision"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.base_precision=fp4"])


def test_memory_estimate_counts_the_fp8_base():
    from transformers import LlamaConfig

    from medtune.train import memory

    # the Llama-3.2-1B shape, counted on the meta device
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    fp8_cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.base_precision=fp8", "train.precision=bf16"])
    bf16_cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.precision=bf16"])
    small = memory.estimate(fp8_cfg, config, "bf16", 1, torch.device("cpu"))
    full = memory.estimate(bf16_cfg, config, "bf16", 1, torch.device("cpu"))
    linears = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    rows = 16 * (2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048)
    rest = 128256 * 2048 + 16 * 2 * 2048 + 2048  # embeddings (tied head), the layers' two norms, the final norm
    assert full["base_params"] == linears + rest
    assert small["per_process_gib"]["weights"] == round((linears + 4 * rows + 2 * rest) / 2**30, 2)
    assert full["per_process_gib"]["weights"] == round(2 * (linears + rest) / 2**30, 2)
    assert small["estimated_peak_gib"] < full["estimated_peak_gib"]
    assert small["per_process_gib"]["fp8_backward_scratch"] > 0 and "fp8_backward_scratch" not in full[
        "per_process_gib"]


def test_the_train_stage_on_an_fp8_base_learns_as_bf16_does_and_its_adapter_merges(tiny_config, tmp_path,
                                                                                    monkeypatch):
    """The whole train stage with `base_precision: fp8` (the GPU's FP8 matmul emulated on this CPU) against the same
    run on the bf16 base: per-step losses, a plain PEFT adapter, and the merge stage on the original base."""
    import json

    import yaml

    from medtune.artifacts import RunDir
    from medtune.pipeline import BY_NAME, run_stage
    from medtune.ui import UI

    monkeypatch.setattr(fp8, "unsupported_reason", lambda device: None)
    losses = {}
    for precision in ("bf16", "fp8"):
        raw = yaml.safe_load(tiny_config.read_text())
        raw["run_dir"] = str(tmp_path / precision)
        raw["train"] |= {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "threads": 1, "device": "cpu",
                         "precision": "bf16", "base_precision": precision,
                         "lora": {"target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]}}
        path = tmp_path / f"{precision}.yaml"
        path.write_text(yaml.safe_dump(raw))
        cfg = load_config(path)
        run = RunDir(cfg.run_dir)
        run_stage(BY_NAME["data"], cfg, run, UI())
        report = run_stage(BY_NAME["train"], cfg, run, UI())
        assert report["base_precision"] == precision
        metrics = (run / "adapter" / "metrics.jsonl").read_text().splitlines()
        losses[precision] = [json.loads(line)["loss"] for line in metrics if "loss" in json.loads(line)]
    assert len(losses["fp8"]) == 4
    rel_diff = [abs(a - b) / b for a, b in zip(losses["fp8"], losses["bf16"])]
    assert max(rel_diff) < 1e-2, rel_diff
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == [
        "down_proj", "gate_proj", "q_proj", "v_proj"]
    merged = run_stage(BY_NAME["merge"], cfg, run, UI())  # onto the original base, with merge's own logits check
    assert (run / "merged" / "config.json").is_file() and merged


def test_the_loss_module_over_an_fp8_base_gives_summed_and_per_token_losses_close_to_full_precision():
    """What SFT and the preference objectives read from the head (CausalLMLoss: summed loss, per-token
    log-probabilities), on the same model with and without its FP8 base."""
    from medtune.train.loss import CausalLMLoss, label_positions

    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[:, :8] = -100
    index, targets = label_positions(labels)
    positions = torch.arange(24).repeat(2, 1)
    found = {}
    for name in ("full", "fp8"):
        model = tiny_llama(seed=7)
        if name == "fp8":
            fp8.quantize_base_(model)
        loss_model = CausalLMLoss(model)
        with torch.no_grad():
            found[name] = (loss_model(ids, positions, index, targets),
                           loss_model(ids, positions, index, targets, per_token=True))
    (full_sum, full_tokens), (fp8_sum, fp8_tokens) = found["full"], found["fp8"]
    assert full_tokens.shape == (32,) and torch.allclose(fp8_tokens.sum(), -fp8_sum, rtol=1e-5)
    assert abs(float(fp8_sum) - float(full_sum)) / float(full_sum) < 1e-2
    assert (fp8_tokens - full_tokens).abs().max() < 0.05
