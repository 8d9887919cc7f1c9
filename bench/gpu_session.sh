#!/usr/bin/env bash
# Calls on a lent GPU machine (the device tool runs them in the repo root; results go to $OUT).
# Each stage fits one 10-minute call:
#   bash bench/gpu_session.sh tests      # GPU tests (bf16 included) + the tiling sweep
#   bash bench/gpu_session.sh kernel     # python -m bench kernel
#   bash bench/gpu_session.sh video      # python -m bench long-video
#   bash bench/gpu_session.sh training   # python -m bench training
#   bash bench/gpu_session.sh interactive  # python -m bench interactive + interactive-eval
# The machine has torch + Triton but no internet: the package is used from the work tree.
set -uo pipefail
OUT=${OUT:-/tmp/stm_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 STM_BENCH_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
case "${1:-tests}" in
  tests)
    step python3 -m pytest -q -m gpu -x tests -p no:cacheprovider
    step python3 -m bench.tune --quick --ns 162000 --batches 1 ;;
  kernel) step python3 -m bench kernel ;;
  video) step python3 -m bench long-video ;;
  training) step python3 -m bench training ;;
  interactive)
    step python3 -m bench interactive
    step python3 -m bench interactive-eval --sequences blackswan bmx-trees car-shadow ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
ls -l "$OUT"
