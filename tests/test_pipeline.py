"""The stages on a tiny random Llama: files, numbers, and the skip logic of `medtune run`."""

import json

import numpy as np

from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.pipeline import BY_NAME, run_stage, stage_fingerprint
from medtune.ui import UI


def test_data_train_merge_and_skip_logic(tiny_config):
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    for name in ("data", "train", "merge"):
        run_stage(BY_NAME[name], cfg, run, UI())

    report = json.loads((run / "prepared" / "report.json").read_text())
    assert report["records_read"] == 24 == report["used"] + report["rejected"]
    assert report["train_rows"] + report["val_rows"] == report["used"]
    offsets = np.load(run / "prepared" / "train.offsets.npy")
    assert len(offsets) == report["train_rows"] + 1 and offsets[-1] == report["train_tokens"]
    assert max(np.diff(offsets)) <= cfg.data.max_len

    steps = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    assert all(np.isfinite(s["loss"]) for s in steps if "loss" in s)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"]) == (8, 16)
    assert sorted(adapter_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    merge = run.manifest("merged")["results"]
    assert merge["max_logit_diff"] < merge["tolerance"] == 1e-3
    generation = json.loads((run / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2] and generation["pad_token_id"] == 0
    assert (generation["temperature"], generation["top_p"]) == (0.7, 0.9)
    assert (run / "merged" / "chat_template.jinja").is_file()

    for name in ("data", "train", "merge"):
        stage = BY_NAME[name]
        assert run.is_current(stage.folder, stage_fingerprint(stage, cfg, run))
    changed = load_config(tiny_config, ["train.lr=5e-4"])
    assert run.is_current("prepared", stage_fingerprint(BY_NAME["data"], changed, run))
    assert not run.is_current("adapter", stage_fingerprint(BY_NAME["train"], changed, run))
    tokenizer_change = load_config(tiny_config, ["data.max_len=64"])
    assert not run.is_current("prepared", stage_fingerprint(BY_NAME["data"], tokenizer_change, run))


def test_changed_input_file_invalidates_data(tiny_config):
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    before = stage_fingerprint(BY_NAME["data"], cfg, run)
    with open(cfg.data.path, "a", encoding="utf-8") as fh:
        fh.write('{"instruction": "Please answer: new?", "input": "", "output": "The answer is A."}\n')
    assert stage_fingerprint(BY_NAME["data"], cfg, run) != before


def test_changed_benchmark_invalidates_data_checked_against_it(tiny_config):
    """The contamination check reads the eval benchmarks: editing one makes prepared/ out of date (unless ignored)."""
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    ignoring = cfg.model_copy(update={"data": cfg.data.model_copy(update={"contamination": "ignore"})})
    before = stage_fingerprint(BY_NAME["data"], cfg, run), stage_fingerprint(BY_NAME["data"], ignoring, run)
    with open(cfg.eval.benchmarks[0].path, "a", encoding="utf-8") as fh:
        fh.write('{"question": "New?", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}\n')
    assert stage_fingerprint(BY_NAME["data"], cfg, run) != before[0]
    assert stage_fingerprint(BY_NAME["data"], ignoring, run) == before[1]


def test_eval_on_hf_model_writes_items_and_summary(tiny_config):
    from medtune.evaluate import stage as evaluate

    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    for name in ("data", "train", "merge"):
        run_stage(BY_NAME[name], cfg, run, UI())
    out = run / "eval"
    out.mkdir()
    summary = evaluate.run(cfg, run, out, UI())
    result = summary["models"]["merged"]["bench"]
    assert result["n"] == 2
    items = [json.loads(line) for line in (out / "merged" / "bench.jsonl").read_text().splitlines()]
    assert [i["gold"] for i in items] == ["A", "B"]
    assert all(i["correct"] == (i["extracted"] == i["gold"]) for i in items)
    assert result["correct"] == sum(i["correct"] for i in items)
    assert "| merged | bench | 2 |" in (out / "results.md").read_text()
    assert "not a medical device" in (out / "results.md").read_text()


def test_packing_keep_answer_and_contamination_drop(tiny_config, tmp_path):
    import yaml
    from conftest import reasonmed_record, write_jsonl

    records = [reasonmed_record(i) for i in range(24)]
    long_reply = "\n".join(f"{i}. A long step about the kidney number {i}." for i in range(60))
    records[3]["output"] = f"{long_reply}\nSummary: long.\nThe answer is D."
    bench_question = "Question number 5 about the heart?"
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "bench.jsonl", [{"question": bench_question, "options": {"A": "a", "B": "b"},
                                            "answer_idx": "A"}])
    raw = yaml.safe_load(tiny_config.read_text())
    raw["data"] |= {"packing": True, "length_policy": "keep_answer", "contamination": "drop", "max_len": 200}
    tiny_config.write_text(yaml.safe_dump(raw))
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    report = json.loads((run / "prepared" / "report.json").read_text())
    assert report["records_read"] == 24 == report["used"] + report["rejected"]
    assert report["rejected_by_reason"] == {"overlaps an evaluation question": 1}
    assert report["contaminated"] == 1
    assert report["shortened_keep_answer"] == 1 and report["truncated"] == 0
    assert report["splits"]["train"]["packed_rows"] < report["train_rows"]
    contaminated = [json.loads(line) for line in (run / "prepared" / "contamination.jsonl").read_text().splitlines()]
    assert contaminated[0]["location"] == "train.jsonl:6"
    run_stage(BY_NAME["train"], cfg, run, UI())
    train = run.manifest("adapter")["results"]
    assert np.isfinite(train["final_loss"]) and train["steps"] == 3


def test_data_stage_reruns_when_the_objective_switches_to_pairs(tiny_config):
    """SFT and DPO read the same file differently (conversations vs pairs): switching must prepare the data again."""
    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import BY_NAME, stage_fingerprint

    sft = load_config(tiny_config)
    dpo = load_config(tiny_config, ["train.objective=dpo"])
    orpo = load_config(tiny_config, ["train.objective=orpo"])
    run = RunDir(sft.run_dir)
    prints = [stage_fingerprint(BY_NAME["data"], c, run) for c in (sft, dpo, orpo)]
    assert prints[0] != prints[1] == prints[2]
