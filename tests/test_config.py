from pathlib import Path

import pytest

from medtune.config import load_config
from medtune.errors import MedtuneError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_resolve_paths():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.data.path == ROOT / "examples" / "reasonmed_sample.jsonl"
    assert demo.run_dir == ROOT / "runs" / "demo"
    assert demo.export.types == ["F16", "Q8_0", "Q5_K_M", "Q4_K_M"]


def test_reference_config_is_the_seed_recipe():
    ref = load_config(ROOT / "configs" / "llama-3.2-1b-reasonmed.yaml")
    assert ref.base.model == "meta-llama/Llama-3.2-1B-Instruct"
    assert (ref.data.dataset, ref.data.data_file, ref.data.max_len) == ("lingshu-medical-mllm/ReasonMed",
                                                                         "ReasonMed.json", 512)
    lora = ref.train.lora
    assert (lora.r, lora.alpha, lora.dropout) == (8, 16, 0.05)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = ref.train
    assert (t.optimizer, t.epochs, t.batch_size, t.grad_accum, t.lr, t.warmup_steps, t.precision) == (
        "adafactor", 3, 4, 4, 2e-4, 20, "fp16")
    assert ref.export.name == "llama3.2-1b-medical-reasonmed"
    assert sorted(ref.export.types) == sorted(["F16", "Q4_K_M", "Q5_K_M", "Q8_0"])


def test_overrides_parse_yaml_scalars():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.lr=1e-4", "train.max_steps=3", "data.limit=null"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 3 and cfg.data.limit is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=-1", "train.lr: Input should be greater than 0, got -1"),
        ("train.batch_size=four", "train.batch_size: Input should be a valid integer"),
        ("data.path=nope.jsonl", "data.path: file not found"),
        ("export.types=[Q9_9]", "unknown GGUF type"),
    ],
)
def test_bad_values_give_one_clear_line(override, expected):
    with pytest.raises(MedtuneError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MedtuneError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(MedtuneError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("name: x\nrun_dir: r\nbase: {model: a/b}\nexport: {name: x}\n", encoding="utf-8")
    with pytest.raises(MedtuneError, match="data: required key is missing"):
        load_config(bad)


def test_fast_config_keeps_the_reference_data_and_lora():
    ref = load_config(ROOT / "configs" / "llama-3.2-1b-reasonmed.yaml")
    fast = load_config(ROOT / "configs" / "llama-3.2-1b-reasonmed-fast.yaml")
    assert (fast.base, fast.train.lora) == (ref.base, ref.train.lora)
    assert (fast.data.dataset, fast.data.data_file) == (ref.data.dataset, ref.data.data_file)
    assert (fast.data.max_len, fast.data.length_policy, fast.data.packing) == (2048, "keep_answer", True)
    assert (fast.train.precision, fast.train.attention, fast.train.compile) == ("bf16", "flex_attention", True)
