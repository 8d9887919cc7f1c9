#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool runs it in the repo root; results go to $OUT):
#   bash bench/gpu_session.sh            # GPU tests, the kernel benchmark, the tiling sweep
# The machine has torch + Triton but no internet: the package is used from the work tree.
set -uo pipefail
OUT=${OUT:-/tmp/stm_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
step python3 -m pytest -q -m gpu -x tests -p no:cacheprovider
step python3 -m bench.tune --quick --ns 162000 --batches 1
step python3 -m bench.memory_read
cp bench/results/*.json bench/results/*.png "$OUT"/ 2>/dev/null
ls -l "$OUT"
