#!/usr/bin/env bash
# GPU tests, benchmarks and profiles on a CUDA host with vLLM on the path.
#   bash bench/run_device.sh tests   # GPU tests (tests/test_gpu.py, tests/test_triton_steer.py)
#   bash bench/run_device.sh shapes  # real model shapes on both model runners, several at a time as memory allows (bench/shape_lanes.py)
#   bash bench/run_device.sh bench   # the GPU benchmark preset
#   bash bench/run_device.sh layer   # per-layer cost of the steering path (bench/layer_cost.py)
#   bash bench/run_device.sh profile --requests 1 256   # kernels per step, steered vs plain (bench/profile_steps.py)
#   bash bench/run_device.sh serve   # plain vLLM's server against workbench serve (bench/bench_serve.py)
set -euo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export VLLM_DISABLE_COMPILE_CACHE=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast off for TP runs: on shared GPUs it can take the card down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_steer.py "${@:2}" ;;
  # vLLM's compile cache on: the second runner of a shape reuses the first's graphs (the
  # runtime's settings salt the cache key, and a fresh host has no stale entries).
  shapes) env -u VLLM_DISABLE_COMPILE_CACHE python3 bench/shape_lanes.py "${@:2}" ;;
  layer) python3 bench/layer_cost.py "${@:2}" ;;
  profile) PYTHONPATH="$PWD/bench:$PYTHONPATH" python3 bench/profile_steps.py gpu "${@:2}" ;;
  # With $OUT set, the result just written is copied there too.
  bench) python3 bench/bench_steering.py --preset gpu "${@:2}" && if [ -n "${OUT:-}" ]; then cp "$(ls -t bench/results/*.json | head -1)" "$OUT"/; fi ;;
  serve) python3 bench/bench_serve.py --preset gpu "${@:2}" && if [ -n "${OUT:-}" ]; then cp "$(ls -t bench/results/*-serve-*.json | head -1)" "$OUT"/; fi ;;
esac
