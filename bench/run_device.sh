#!/usr/bin/env bash
# Runs on the lent GPU machine after ../shared/gpu/README.md's set-up (source /tmp/b/env.sh first).
#   bash bench/run_device.sh tests   # GPU tests (tests/test_gpu.py)
#   bash bench/run_device.sh bench   # the GPU benchmark preset
set -euo pipefail
if [ ! -f /tmp/site/.workbench-extra ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/b/extra/whl/*.whl
  touch /tmp/site/.workbench-extra
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export VLLM_DISABLE_COMPILE_CACHE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py "${@:2}" ;;
  bench) python3 bench/bench_steering.py --preset gpu "${@:2}" && mkdir -p "$OUT" && cp bench/results/*gpu*.json "$OUT"/ ;;
esac
