import subprocess
import sys

from conftest import medtune


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; sys.argv = ['medtune', '--help']\nimport medtune.cli\n"
            "try:\n    medtune.cli.app()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'peft') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stdout
    for command in ("data", "train", "merge", "export", "chat", "eval", "run"):
        assert command in out.stdout


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    for args, needle in [
        (["run", "configs/demo.yaml", "--set", "train.nope=1"], "train.nope: unknown key"),
        (["run", "configs/demo.yaml", "--set", "train.epochs=many"], "train.epochs"),
        (["run", "configs/demo.yaml", "--set", "data.path=missing.jsonl"], "data.path: file not found"),
        (["run", str(tmp_path / "absent.yaml")], "config file not found"),
    ]:
        proc = medtune(*args)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_chat_on_missing_model_is_a_clear_error(tmp_path):
    proc = medtune("chat", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert proc.returncode == 2
    assert "GGUF file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_data_check_exit_codes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "Please answer: q?", "input": "", "output": "The answer is A."}\n',
                    encoding="utf-8")
    proc = medtune("data", "check", str(good))
    assert proc.returncode == 0 and "1 records, 1 usable, 0 rejected" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{oops\n" + '{"instruction": "q", "output": null}\n', encoding="utf-8")
    proc = medtune("data", "check", str(bad))
    assert proc.returncode == 1
    assert "bad.jsonl:2" in proc.stdout and "bad.jsonl:3" in proc.stdout and "field 'output' is null" in proc.stdout
    proc = medtune("data", "check", str(bad), "--json")
    assert proc.returncode == 1 and '"rejected": 2' in proc.stdout
    for unreadable in (tmp_path / "missing.jsonl", tmp_path):
        proc = medtune("data", "check", str(unreadable))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
