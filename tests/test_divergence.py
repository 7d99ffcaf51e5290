"""Divergence from F16 and retention (known distributions), the recommended file, export.imatrix and the tool build's
fallback: fast, no llama.cpp model loaded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medtune.export import divergence, recommend, tools
from medtune.gguf_types import fallback


def test_kl_same_top_and_nll_on_known_distributions():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    q = np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]])
    logits = np.log(q) + np.array([[3.0], [-7.0]])  # a constant per row changes no probability
    stats = divergence.position_stats(np.log(p), logits, np.array([1, 2]))
    assert stats["kld"] == pytest.approx([0.25 * math.log(2), 0.0], abs=1e-12)  # sum p log(p/q): KL(ref || file)
    assert stats["same_top"].tolist() == [False, True]
    assert stats["nll"] == pytest.approx([math.log(2), -math.log(0.8)])
    assert stats["nll_reference"] == pytest.approx([math.log(4), -math.log(0.8)])
    # the direction matters: KL(q || p) on the first row is 0.25 ln 2 too only by symmetry of this pair; another pair
    r = np.array([[0.9, 0.05, 0.05]])
    forward = divergence.position_stats(np.log(r), np.log(p[:1]), np.array([0]))["kld"][0]
    assert forward == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.05 / 0.25))


def test_summary_numbers_match_llama_cpp_definitions():
    rng = np.random.default_rng(0)
    kld = rng.exponential(0.05, size=1001)
    nll, nll_ref = rng.uniform(1, 3, 1001), rng.uniform(1, 3, 1001)
    same = rng.random(1001) < 0.9
    s = divergence.summarize({"kld": kld, "same_top": same, "nll": nll, "nll_reference": nll_ref})

    def llama_cpp_percentile(values: np.ndarray, fraction: float) -> float:  # perplexity.cpp's `percentile`
        values = np.sort(values)
        pos = fraction * (len(values) - 1)
        i = int(pos)
        return (1 - (pos - i)) * values[i] + (pos - i) * values[min(i + 1, len(values) - 1)]

    assert s["positions"] == 1001
    assert s["mean_kld"] == pytest.approx(kld.mean(), abs=1e-6)
    assert s["p99_kld"] == pytest.approx(llama_cpp_percentile(kld, 0.99), abs=1e-6)
    assert s["max_kld"] == pytest.approx(kld.max(), abs=1e-6)
    assert s["same_top"] == pytest.approx(same.mean(), abs=1e-5)
    assert s["ppl"] == pytest.approx(math.exp(nll.mean()), abs=1e-4)
    assert s["ppl_diff"] == pytest.approx(math.exp(nll.mean()) - math.exp(nll_ref.mean()), abs=2e-4)


def test_retention():
    assert divergence.retention(0.02, 0.4) == pytest.approx(0.95)  # keeps 95% of what tuning moved
    assert divergence.retention(0.0, 0.4) == 1.0  # the tuned model itself
    assert divergence.retention(0.4, 0.4) == 0.0  # as far from F16 as the base
    assert divergence.retention(0.6, 0.4) == pytest.approx(-0.5)  # further than the base: negative
    assert divergence.retention(0.01, 0.0) is None  # the tuning moved nothing: no ratio
    assert divergence.retention(0.0065, 0.0044) is None  # less than MIN_BASE_KLD: a ratio of noise


def test_held_out_keeps_whole_conversations_up_to_the_budget():
    seqs = [[1], [1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert divergence.held_out(seqs, max_positions=100) == [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert divergence.held_out(seqs, max_positions=4) == [[1, 2, 3], [4, 5, 6]]  # 2 + 2 scored positions


class FakeLlama:
    """Stands in for parity.LlamaLogits: deterministic logits per (model seed, position, token)."""

    def __init__(self, seed: int, n_vocab: int = 11) -> None:
        self.seed, self.vocab = seed, n_vocab
        self.llm = self

    def n_vocab(self) -> int:
        return self.vocab

    def __call__(self, ids: list[int]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *ids])
        return rng.normal(size=(len(ids), self.vocab)).astype(np.float32)


def test_reference_on_disk_compares_every_scored_position(tmp_path):
    sequences = [[1, 2, 3, 4, 5], [i % 11 for i in range(80)]]  # 79 positions: more than one ROW_BLOCK
    ref, other = FakeLlama(0), FakeLlama(1)
    for first in (0, 2):
        reference = divergence.Reference(ref, sequences, tmp_path, first=first)
        got = reference.compare(other)
        parts = [divergence.position_stats(divergence.log_softmax(ref(s)[first:-1]), other(s)[first:-1],
                                           np.array(s[first + 1 :])) for s in sequences]
        expected = divergence.summarize({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        assert got == expected and got["positions"] == sum(len(s) - 1 - first for s in sequences)
        assert reference.compare(ref)["mean_kld"] == pytest.approx(0.0, abs=1e-6)
        assert reference.compare(ref)["same_top"] == 1.0


def file_result(name: str, size: int, kld: float | None = None, kept: float | None = None, stops: bool = True,
                problems: tuple[str, ...] = ()) -> dict:
    result = {"file": name, "bytes": size, "stops": stops, "problems": list(problems),
              "stop_problems": [] if stops else ["did not stop at the end-of-turn token within 512 tokens"]}
    if kld is not None:
        result["divergence"] = {"mean_kld": kld, "retention": kept}
    return result


def test_recommend_picks_the_smallest_file_that_stops_and_keeps_the_tuning():
    files = {"F16": file_result("m-fp16.gguf", 1000), "Q8_0": file_result("m-Q8_0.gguf", 530, 0.002, 0.995),
             "Q5_K_M": file_result("m-Q5_K_M.gguf", 400, 0.05, 0.80),
             "Q4_K_M": file_result("m-Q4_K_M.gguf", 350, 0.03, 0.93, stops=False)}
    choice = recommend.recommend(files)
    assert choice["type"] == "Q8_0" and choice["file"] == "m-Q8_0.gguf"
    assert "99.5% of the tuning" in choice["why"]
    assert choice["rejected"]["Q5_K_M"] == f"retention 0.800 < {recommend.MIN_RETENTION}"
    assert "did not end at the end-of-turn token" in choice["rejected"]["Q4_K_M"]  # smallest, but never recommended
    assert choice["thresholds"] == {"min_retention": 0.9, "max_mean_kld": 0.1}

    files["Q4_K_M"]["stops"] = True
    assert recommend.recommend(files)["type"] == "Q4_K_M"
    files["Q4_K_M"]["divergence"]["mean_kld"] = 0.2  # far from F16 although the tuning was large
    assert recommend.recommend(files)["rejected"]["Q4_K_M"] == "mean KL divergence from F16 0.2000 > 0.1"
    files["Q4_K_M"]["divergence"].update(mean_kld=0.03, retention=None)  # no base measured: divergence alone
    assert recommend.recommend(files)["type"] == "Q4_K_M"


def test_recommend_falls_back_to_the_float_file_and_never_to_a_failed_one():
    files = {"F16": file_result("m-fp16.gguf", 1000),
             "Q4_K_M": file_result("m-Q4_K_M.gguf", 350, 0.5, 0.2),
             "Q2_K": file_result("m-Q2_K.gguf", 200, 0.01, 0.99, problems=("tokenizer: ids differ",)),
             "Q5_K_M": file_result("m-Q5_K_M.gguf", 400, problems=())}
    files["Q5_K_M"]["divergence"] = {"error": "vocabulary of 10 tokens"}
    choice = recommend.recommend(files)
    assert choice["type"] == "F16" and choice["why"].startswith("the tuned model itself")
    assert choice["rejected"]["Q2_K"] == "failed a check: tokenizer: ids differ"
    assert choice["rejected"]["Q5_K_M"] == "no divergence numbers (vocabulary of 10 tokens)"
    assert recommend.recommend({"Q4_K_M": files["Q4_K_M"]})["type"] is None


def test_fallback_counts_the_k_quant_matrices_stored_as_legacy_types():
    smollm2_q4 = {"Q5_0": 166, "Q4_K": 16, "Q6_K": 16, "Q8_0": 13}  # SmolLM2's 576-wide rows
    fell = fallback("Q4_K_M", smollm2_q4)
    assert fell == {"matrices": 211, "fallback": 179, "fallback_types": {"Q5_0": 166, "Q8_0": 13}, "most": True}
    assert fallback("Q4_K_M", {"Q4_K": 14, "Q6_K": 2})["most"] is False
    assert fallback("Q8_0", {"Q8_0": 211}) is None and fallback("F16", {"F16": 10}) is None


@pytest.mark.parametrize(("value", "expected"), [(True, "on"), (False, "off"), ("on", "on"), ("OFF", "off")])
def test_imatrix_setting_reads_yaml_switches(value, expected):
    from medtune.config import ExportConfig

    assert ExportConfig(name="m").imatrix == "on"  # on by default
    assert ExportConfig(name="m", imatrix=value).imatrix == expected


def test_imatrix_path_is_resolved_against_the_config_and_must_exist(tmp_path):
    from medtune.config import load_config
    from medtune.errors import MedtuneError

    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "mine.imatrix").write_bytes(b"x")
    config = tmp_path / "run.yaml"
    config.write_text("name: r\nrun_dir: runs\nbase: {model: a/b}\ndata: {path: data.jsonl}\n"
                      "export: {name: r, imatrix: mine.imatrix}\n")
    assert load_config(config).export.imatrix == tmp_path / "mine.imatrix"
    assert load_config(config, ["export.imatrix=off"]).export.imatrix == "off"
    with pytest.raises(MedtuneError, match=r"run.yaml: export.imatrix: file not found: .*missing.dat \(use on, off"):
        load_config(config, ["export.imatrix=missing.dat"])


def test_without_cmake_the_tools_are_one_line_and_export_quantizes_plainly(tmp_path, monkeypatch):
    from medtune.config import Config
    from medtune.export import stage
    from medtune.ui import UI

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))  # nothing built in this cache
    monkeypatch.setenv("CMAKE", str(tmp_path / "no-cmake"))
    with pytest.raises(tools.ToolsUnavailable, match="no cmake found"):
        tools.tools()

    class Log(UI):
        lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    cfg = Config.model_validate({"name": "r", "run_dir": str(tmp_path), "base": {"model": "a/b"},
                                 "data": {"path": "x.jsonl"}, "export": {"name": "r"}})
    record, weights = stage._importance_matrix(cfg, tmp_path, None, tmp_path / "r-fp16.gguf", tmp_path, Log())
    assert weights is None and record["used"] is False and "no cmake found" in record["reason"]
    assert record["types"] == ["Q5_K_M", "Q4_K_M"]  # Q8_0 and F16 never use one
    assert Log.lines == [f"[yellow]warning: export: {record['reason']}; quantizing without an importance matrix[/]"]
    off = cfg.model_copy(update={"export": cfg.export.model_copy(update={"imatrix": "off"})})
    assert stage._importance_matrix(off, tmp_path, None, Path("x"), tmp_path, Log())[0]["reason"] == \
        "export.imatrix is off"
