"""llama.cpp's command-line tools (`llama-imatrix`, `llama-quantize`, `llama-perplexity`), built once from the source
archive that also gives medtune the converter, so tools and runtime are the same llama.cpp version.

The installed llama-cpp-python wheel has only the library, and its `llama_model_quantize` cannot take an importance
matrix from Python (llama.cpp passes it as a C++ map), so imatrix quantization needs the tools. They are built with
CMake (Release, `-DGGML_NATIVE=OFF` like the library: a native build crashed on quantized files on AVX-512 CPUs,
only the targets asked for, static, two jobs) into `$MEDTUNE_CACHE/llama.cpp/<version>-tools/` beside the converter:
`src/` (the sources), `build/`, and `bin/`, where a tool appears only once it is built. `make install` builds them
(`python -m medtune.export.tools`); otherwise the first export that needs them does. No download beyond the source
archive. A machine that cannot build them (no cmake or C++ compiler, a failed build) gets one line saying so
(`ToolsUnavailable`), and export quantizes without an importance matrix.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.export.gguf import extract, llama_cpp_version
from medtune.models import cache_dir

EXPORT_TOOLS = ("llama-imatrix", "llama-quantize")  # what an export with an importance matrix runs
# What CMake needs from vendor/llama.cpp/ (not the 75 MB of vocabularies under models/, nor docs or tests).
BUILD_PARTS = ("CMakeLists.txt", "cmake/", "ggml/", "src/", "include/", "common/", "vendor/", "tools/", "LICENSE",
               "licenses/")
CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON")
JOBS = "2"


class ToolsUnavailable(MedtuneError):
    """llama.cpp's tools cannot be built here; the message is the one line the user sees."""


def tools_dir() -> Path:
    return cache_dir() / "llama.cpp" / f"{llama_cpp_version()}-tools"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ToolsUnavailable(f"llama.cpp's tools: {what} failed ({tail}); see `{shlex.join(cmd)}` in {cwd}")


def build(targets: tuple[str, ...]) -> dict[str, Path]:
    """Build the missing `targets` (one process at a time: a file lock), then return every target's path."""
    from filelock import FileLock

    root = tools_dir()
    cmake = os.environ.get("CMAKE", "cmake")
    if not shutil.which(cmake) or _compiler() is None:
        missing = "cmake" if not shutil.which(cmake) else "a C++ compiler"
        raise ToolsUnavailable(f"llama.cpp's tools cannot be built: no {missing} found (install cmake and a C++ "
                               "compiler, e.g. `apt install cmake g++` or `pip install cmake`)")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        missing_targets = [t for t in targets if not (root / "bin" / t).is_file()]
        if missing_targets:
            if not (root / "src" / "CMakeLists.txt").is_file():
                extract(BUILD_PARTS, root / "src", "CMakeLists.txt")
            extra = shlex.split(os.environ.get("MEDTUNE_LLAMA_CMAKE_ARGS", ""))
            _run([cmake, "-S", str(root / "src"), "-B", str(root / "build"), *CMAKE_ARGS, *extra], root, "cmake")
            _run([cmake, "--build", str(root / "build"), "--config", "Release", "-j", JOBS, "--target",
                  *missing_targets], root, "the build")
            (root / "bin").mkdir(exist_ok=True)
            for target in missing_targets:  # a tool appears in bin/ complete or not at all
                built = root / "build" / "bin" / target
                if not built.is_file():
                    raise ToolsUnavailable(f"llama.cpp's tools: the build made no {target}")
                partial = root / "bin" / f".{target}.partial"
                shutil.copy2(built, partial)
                partial.rename(root / "bin" / target)
    return {t: root / "bin" / t for t in targets}


def tools(targets: tuple[str, ...] = EXPORT_TOOLS) -> dict[str, Path]:
    """The tools' paths, built first if they are not in the cache."""
    root = tools_dir()
    if all((root / "bin" / t).is_file() for t in targets):
        return {t: root / "bin" / t for t in targets}
    return build(targets)


def main(argv: list[str]) -> int:
    """`python -m medtune.export.tools [TARGET ...]`: build the tools now (`make install` does)."""
    targets = tuple(argv) or EXPORT_TOOLS
    start = time.perf_counter()
    try:
        paths = tools(targets)
    except MedtuneError as exc:
        print(f"warning: {exc}; export will quantize without an importance matrix", file=sys.stderr)
        return 0  # an install without the tools still works
    print(f"llama.cpp tools ready in {time.perf_counter() - start:.0f} s: " + ", ".join(map(str, paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
