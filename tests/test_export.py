"""GGUF conversion, quantization and the verification checks on a tiny random Llama."""

import pytest

from medtune.export import gguf, verify


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    f16 = out / gguf.file_name("tiny", "F16")
    gguf.convert(tiny_base, f16)
    files = {"F16": f16}
    for t in ("Q8_0", "Q4_K_M"):
        files[t] = out / gguf.file_name("tiny", t)
        gguf.quantize(f16, files[t], t)
    return files


def test_names_follow_the_seed():
    assert gguf.file_name("m", "F16") == "m-fp16.gguf"
    assert gguf.file_name("m", "BF16") == "m-bf16.gguf"
    assert gguf.file_name("m", "Q4_K_M") == "m-Q4_K_M.gguf"


def test_converted_files_pass_metadata_checks(tiny_ggufs, smollm2_tokenizer):
    for gguf_type, path in tiny_ggufs.items():
        checks = verify.check_metadata(path, gguf_type, smollm2_tokenizer.chat_template, 2)
        assert checks["problems"] == [], (gguf_type, checks)
        assert checks["architecture"] == "llama"
        assert checks["chat_template_matches"]
    q4 = verify.check_metadata(tiny_ggufs["Q4_K_M"], "Q4_K_M", smollm2_tokenizer.chat_template, 2)
    assert q4["tensor_types"].get("Q4_K", 0) > 0


def test_checks_catch_a_file_whose_name_lies(tiny_ggufs, smollm2_tokenizer):
    checks = verify.check_metadata(tiny_ggufs["Q8_0"], "Q4_K_M", smollm2_tokenizer.chat_template, 2)
    assert any("general.file_type" in p for p in checks["problems"])
    assert any("no tensor of type Q4_K" in p for p in checks["problems"])
    wrong = verify.check_metadata(tiny_ggufs["F16"], "F16", "{{ other template }}", 7)
    assert "the chat template differs from the HF model's" in wrong["problems"]
    assert any("eos token id" in p for p in wrong["problems"])


def test_runtime_check_loads_the_file_and_reports_no_stop(tiny_ggufs):
    result = verify.check_runtime(tiny_ggufs["Q4_K_M"], "Hello?", max_tokens=8)
    assert result["completion_tokens"] > 0
    assert result["finish_reason"] == "length"  # a random model does not stop within 8 tokens
    assert "did not stop at the end-of-turn token within 8 tokens" in result["problems"]
