"""The demo run shared by the end-to-end tests (one `medtune run configs/demo.yaml` per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "medtune.cli", "run", "configs/demo.yaml", "--set", f"run_dir={run_dir}",
           "--set", "eval.limit=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc
