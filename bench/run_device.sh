#!/usr/bin/env bash
# Runs on the lent GPU machine after ../shared/gpu/README.md's set-up (source /tmp/b/env.sh first).
#   bash bench/run_device.sh tests   # GPU tests (tests/test_gpu.py)
#   bash bench/run_device.sh bench   # the GPU benchmark preset
#   bash bench/run_device.sh layer   # per-layer cost of the steering path (bench/layer_cost.py)
#   bash bench/run_device.sh profile --requests 1 256   # kernels per step, steered vs plain (bench/profile_steps.py)
set -euo pipefail
if [ ! -f /tmp/site/.workbench-extra ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/b/extra/whl/*.whl
  touch /tmp/site/.workbench-extra
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export VLLM_DISABLE_COMPILE_CACHE=1 TOKENIZERS_PARALLELISM=false
# The lent machines forbid NVLink multicast (it can take shared GPUs down); keep it off for TP runs.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py "${@:2}" ;;
  layer) python3 bench/layer_cost.py "${@:2}" ;;
  profile) PYTHONPATH="$PWD/bench:$PYTHONPATH" python3 bench/profile_steps.py gpu "${@:2}" ;;
  # Only the result just written comes back (the device tool returns at most 8 files).
  bench) python3 bench/bench_steering.py --preset gpu "${@:2}" && mkdir -p "$OUT" && cp "$(ls -t bench/results/*gpu*.json | head -1)" "$OUT"/ ;;
esac
