#!/usr/bin/env bash
# One call on a 2-GPU machine: the 2-GPU scaling check, then the one-GPU throughput benchmark.
# Wheels for packages the GPU image lacks travel in .whl/; the SmolLM2 tokenizer in .bench_assets/tokenizer/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
case "${1:-all}" in
  multi|all) python3 bench/multi_gpu.py --tokenizer .bench_assets/tokenizer --out "$OUT/multi_gpu.json" 2>&1 | tee "$OUT/multi_gpu.log" ;;
esac
case "${1:-all}" in
  throughput|all) python3 bench/train_throughput.py --variants "${VARIANTS:-flex+compile}" \
    --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log" ;;
esac
