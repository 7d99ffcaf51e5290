"""No network, gated repos and hub datasets: every remote access fails as one line before any long step.

No test here reaches the hub: a missing network is simulated at the socket (name resolution fails, as on an
air-gapped machine), and the `datasets` library is replaced by a stand-in.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medtune import hub
from medtune.cli import app
from medtune.data.sources import Conversation, Rejection, read_hub_records
from medtune.errors import MedtuneError

GOOD = {"instruction": "Please answer the following multiple-choice question:\nQ?\nA. x\nB. y", "input": "",
        "output": "The answer is A."}


@pytest.fixture
def no_network(monkeypatch):
    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, data: dict, base: str = "meta-llama/Llama-3.2-1B-Instruct") -> Path:
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    cfg = {"name": "offline", "run_dir": str(tmp_path / "run"), "base": {"model": base}, "data": data,
           "export": {"name": "offline"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def one_error_line(result) -> str:
    """The error output: one line, and no traceback anywhere."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_no_network_base_model_is_one_line_through_the_cli(tmp_path, no_network):
    config = write_config(tmp_path, {"path": str(tmp_path / "train.jsonl")})
    result = CliRunner().invoke(app, ["data", str(config)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "base.model meta-llama/Llama-3.2-1B-Instruct: cannot reach https://huggingface.co/meta-llama/Llama-3.2-1B" \
           "-Instruct (ConnectError: [Errno -2] Name or service not known)" in line
    assert "local path" in line and "HF_HUB_OFFLINE=1" in line and "HF_ENDPOINT" in line


def test_no_network_hub_dataset_is_one_line_naming_the_dataset(tmp_path, no_network, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    config = write_config(tmp_path, {"dataset": "openlifescienceai/medmcqa", "split": "validation"})
    result = CliRunner().invoke(app, ["data", str(config)])
    assert result.exit_code == 2
    assert "data.dataset openlifescienceai/medmcqa: cannot reach https://hf-mirror.example/datasets/openlifescience" \
           "ai/medmcqa" in one_error_line(result)
    # one file of a dataset: the same line
    config = write_config(tmp_path, {"dataset": "lingshu-medical-mllm/ReasonMed", "data_file": "ReasonMed.json"})
    result = CliRunner().invoke(app, ["data", str(config)])
    assert result.exit_code == 2 and "datasets/lingshu-medical-mllm/ReasonMed" in one_error_line(result)


def test_gated_dataset_without_a_token_is_one_line(monkeypatch):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def gated(self, repo_id, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("GET", f"https://huggingface.co/api/{repo_id}"))
        raise GatedRepoError("401 Client Error: access to this dataset is restricted", response=response)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "repo_info", gated)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
    with pytest.raises(MedtuneError, match=r"^data.dataset acme/private-qa is gated: accept its licence at https://"
                                           r"huggingface.co/datasets/acme/private-qa .* `hf auth login`"):
        read_hub_records("acme/private-qa", None, "train", None)


def test_hub_dataset_is_streamed_with_the_same_accounting(monkeypatch):
    rows = [{"id": "a", "question": "Q1?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 0, "exp": "E."},
            {"id": "b", "question": "Q2?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 3, "exp": None},
            {"id": "c", "question": "Q3?", "opa": "w", "opb": "x", "opc": None, "opd": "z", "cop": 1}]
    calls = []

    def load_dataset(path, name=None, split=None, revision=None, streaming=False):
        calls.append((path, name, split, revision, streaming))
        if split != "validation":
            raise ValueError(f"Bad split: {split}. Available splits: ['train', 'validation', 'test']")
        return iter(rows)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "check_hub_access", lambda *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items = list(read_hub_records("openlifescienceai/medmcqa", "default", "validation", "abc123"))
    assert calls == [("openlifescienceai/medmcqa", "default", "validation", "abc123", True)]
    assert [i.location for i in items] == [f"openlifescienceai/medmcqa/default:validation[{n}]" for n in range(3)]
    assert items[0] == Conversation(items[0].location, (
        {"role": "user", "content": "Please answer the following multiple-choice question:\nQ1?\nA. w\nB. x\nC. y\n"
                                    "D. z"},
        {"role": "assistant", "content": "E.\n\nThe answer is A."}), "medmcqa")
    assert items[1].messages[1]["content"] == "The answer is D."
    assert isinstance(items[2], Rejection) and items[2].reason == "field 'opc' must be the option text (a string)"
    with pytest.raises(MedtuneError, match=r"^data.dataset openlifescienceai/medmcqa: ValueError: Bad split: tset\. "
                                           r"Available splits: .* set data.split / data.config"):
        read_hub_records("openlifescienceai/medmcqa", None, "tset", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MedtuneError, match=r"needs the `datasets` library: pip install datasets"):
        read_hub_records("openlifescienceai/medmcqa", None, "validation", None)


def test_converter_archive_without_network_is_one_line(tmp_path, monkeypatch):
    from medtune.export.gguf import _download_sdist

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: refused at once
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(MedtuneError) as info:
        _download_sdist("0.3.36", tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("export: could not fetch the llama-cpp-python 0.3.36 source")
    assert "MEDTUNE_LLAMA_CPP_SDIST" in message and "PIP_INDEX_URL" in message


HUB_CHECK = """
import sys
from medtune.errors import MedtuneError
from medtune.models import load_tokenizer, resolve_base
try:
    tokenizer = load_tokenizer(resolve_base("acme/tiny-chat"))
except MedtuneError as exc:
    print(exc)
    sys.exit(2)
print("loaded", tokenizer.eos_token)
"""


def test_offline_mode_reads_a_warm_cache_and_says_so_when_cold(tmp_path, smollm2_dir):
    """HF_HUB_OFFLINE=1 with the model in the HF cache works (no hub call: the endpoint is a closed port);
    with a cold cache it is one line."""
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-chat" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                 "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, snapshot / name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)
    warm = subprocess.run([sys.executable, "-c", HUB_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert warm.returncode == 0 and warm.stdout.startswith("loaded "), warm.stderr[-2000:]
    cold = subprocess.run([sys.executable, "-c", HUB_CHECK], capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HOME": str(tmp_path / "empty")})
    assert cold.returncode == 2 and "Traceback" not in cold.stderr
    assert cold.stdout.strip() == ("base.model acme/tiny-chat: its tokenizer is not in the local Hugging Face cache "
                                   "and HF_HUB_OFFLINE=1 forbids downloading it; run once with network, or point "
                                   "base.model at a local model directory")
