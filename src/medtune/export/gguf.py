"""HF -> GGUF conversion and quantization with the very llama.cpp that runs the files.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and its own `gguf-py`) is taken from the source
archive of the installed llama-cpp-python version, fetched from PyPI once and kept in `$MEDTUNE_CACHE/llama.cpp/`
(llama.cpp's tools are built from the same archive: `medtune.export.tools`), the converter unpacked under
`$MEDTUNE_CACHE/llama.cpp/<version>/`. Converter and runtime therefore always come from the same llama.cpp commit,
no git clone is needed, and PyPI is the only network access. The converter runs in its own process with its own
`gguf-py` first on the path, so it never mixes with the PyPI `gguf` package that transformers uses.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.models import cache_dir

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise MedtuneError("llama-cpp-python is not installed; run `make install`") from None


def _download_sdist(version: str, dest: Path) -> Path:
    # Few retries: without a network pip's defaults wait minutes before saying so.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "--retries", "1",
           "--timeout", "30", f"llama-cpp-python=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise MedtuneError(
            f"export: could not fetch the llama-cpp-python {version} source archive (it carries the GGUF converter) "
            f"from the package index with `pip download` ({errors[-1] if errors else 'no archive'}); set "
            f"MEDTUNE_LLAMA_CPP_SDIST to a local copy of llama_cpp_python-{version}.tar.gz, or point pip at a "
            "reachable mirror (PIP_INDEX_URL)"
        )
    return found[0]


def source_archive() -> Path:
    """The llama-cpp-python source archive of the installed version: MEDTUNE_LLAMA_CPP_SDIST, or fetched from the
    package index once and kept in the cache (the converter and llama.cpp's tools are both taken from it)."""
    local = os.environ.get("MEDTUNE_LLAMA_CPP_SDIST")
    if local:
        return Path(local)
    version = llama_cpp_version()
    kept = cache_dir() / "llama.cpp" / f"llama_cpp_python-{version}.tar.gz"
    if kept.is_file():
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kept.parent) as tmp:
        _download_sdist(version, Path(tmp)).rename(kept)
    return kept


def extract(parts: tuple[str, ...], root: Path, marker: str) -> Path:
    """Unpack the members of vendor/llama.cpp/ that start with one of `parts` into `root`, atomically: `root`
    appears complete or not at all. `marker` is a file that must be among them."""
    version = llama_cpp_version()
    sdist = source_archive()
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        staging = Path(tmp) / "src"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(parts)]
            if not any(m.name == prefix + marker for m in members):
                raise MedtuneError(f"{sdist}: no vendor/llama.cpp/{marker} for version {version}")
            tar.extractall(staging, members=members, filter="data")
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(staging / prefix), partial)
        partial.rename(root)
    return root


def converter_dir() -> Path:
    """The cached converter of the installed llama.cpp version, fetched and unpacked on first use."""
    root = cache_dir() / "llama.cpp" / llama_cpp_version()
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    return extract(CONVERTER_PARTS, root, "convert_hf_to_gguf.py")


def convert(model_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """Run llama.cpp's converter in its own process with its own gguf-py."""
    src = converter_dir()
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    env.pop("NO_LOCAL_GGUF", None)  # that variable would make the converter use the PyPI gguf
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
           "--outfile", str(outfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise MedtuneError(f"export: llama.cpp's converter failed on {model_dir}:\n{tail}")


def _quantize_in_process(source: str, target: str, gguf_type: str, threads: int) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.nthread = threads
    return llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)


def quantize(source: Path, target: Path, gguf_type: str, threads: int | None = None,
             imatrix: tuple[Path, Path] | None = None) -> None:
    """Quantize with llama.cpp's own `llama_model_quantize` (the code behind the `llama-quantize` tool).

    It runs in a child process: llama.cpp's log goes to the captured output, and a crash becomes a clear error.
    `imatrix`: (the built `llama-quantize` tool, an importance-matrix file), which the Python binding cannot pass.
    """
    n = str(threads or os.cpu_count() or 1)
    if imatrix is None:
        cmd = [sys.executable, "-m", "medtune.export.gguf", str(source), str(target), gguf_type, n]
    else:
        cmd = [str(imatrix[0]), "--imatrix", str(imatrix[1]), str(source), str(target), gguf_type, n]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"code {proc.returncode}"
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise MedtuneError(f"export: llama.cpp failed to quantize {source.name} to {gguf_type} ({how}):\n{tail}")


if __name__ == "__main__":
    sys.exit(_quantize_in_process(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
