import json

import pytest

from medtune.artifacts import RunDir, atomic_write_json, sha256_file, write_manifest
from medtune.errors import MedtuneError


def test_atomic_stage_folder_appears_only_when_complete(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with run.atomic("gguf") as out:
            (out / "part.gguf").write_bytes(b"x" * 10)
            raise RuntimeError("killed")
    assert not (tmp_path / "run" / "gguf").exists()
    assert not list((tmp_path / "run").glob(".gguf.*"))
    with run.atomic("gguf") as out:
        (out / "a.gguf").write_bytes(b"abc")
        write_manifest(out, "export", "fp1", {"k": 1}, {"ok": True})
    manifest = run.manifest("gguf")
    assert manifest["fingerprint"] == "fp1"
    assert manifest["files"] == [{"path": "a.gguf", "bytes": 3, "sha256": sha256_file(tmp_path / "run/gguf/a.gguf")}]
    assert run.is_current("gguf", "fp1") and not run.is_current("gguf", "fp2")
    with run.atomic("gguf") as out:  # replacing a finished folder
        (out / "b.gguf").write_bytes(b"new")
    assert sorted(p.name for p in (tmp_path / "run" / "gguf").iterdir()) == ["b.gguf"]


def test_require_names_the_command_to_run(tmp_path):
    with pytest.raises(MedtuneError, match="run `medtune train CONFIG` first"):
        RunDir(tmp_path).require("adapter", "medtune train CONFIG")


def test_atomic_write_json(tmp_path):
    path = tmp_path / "x" / "a.json"
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_require_refuses_a_folder_missing_a_file_its_manifest_lists(tmp_path):
    """A partial copy of a run (weights left out) is caught before a stage reads it, not deep inside llama.cpp."""
    run = RunDir(tmp_path)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "notes.txt").write_text("n")
    write_manifest(folder, "merge", "fp", {}, {})
    assert run.require("merged", "medtune merge CONFIG") == folder and run.is_complete("merged")
    (folder / "notes.txt").unlink()
    assert run.require("merged", "medtune merge CONFIG", reads=("*.safetensors",)) == folder  # not a file it reads
    with pytest.raises(MedtuneError, match="notes.txt.*run `medtune merge CONFIG` again"):
        run.require("merged", "medtune merge CONFIG")
    (folder / "model.safetensors").write_bytes(b"x" * 9)
    with pytest.raises(MedtuneError, match="model.safetensors"):
        run.require("merged", "medtune merge CONFIG", reads=("*.safetensors",))
    assert not run.is_complete("merged")
