#!/usr/bin/env bash
# Calls on a lent GPU machine (the device tool runs them in the repo root; results go to $OUT).
# Each stage fits one 10-minute call:
#   bash bench/gpu_session.sh tests      # GPU tests (bf16, the Gluon forward, int64 offsets)
#   bash bench/gpu_session.sh tune       # old vs new kernels and tilings (python -m bench.tune)
#   bash bench/gpu_session.sh kernel     # python -m bench kernel
#   bash bench/gpu_session.sh video      # python -m bench long-video
#   bash bench/gpu_session.sh training   # python -m bench training
#   bash bench/gpu_session.sh interactive  # python -m bench interactive + interactive-eval
#   bash bench/gpu_session.sh profile    # ncu of the default forward and backward kernels
# "tune" compares with the kernels of an earlier commit when .baseline/ holds an export of it:
# run `python -m bench.baseline export REV` here first and pass carry=[".baseline"] to the call.
# The machine has torch + Triton but no internet: the package is used from the work tree.
# "tune" and "kernel" save their JSON after every point: a stage cut off by the time limit
# still returns what it measured (marked "complete": false).
set -uo pipefail
OUT=${OUT:-/tmp/stm_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 STM_BENCH_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
case "${1:-tests}" in
  tests)
    # The kernels' tests first, then the Gluon forward's, then the rest, one line per test;
    # SIGINT before the call's 10-minute limit: pytest then stops cleanly and still writes its
    # junit XML (per-test outcomes and times, to commit beside the benchmark JSON), and KILL
    # 20 s later if a hung kernel keeps it from stopping. The Gluon forward has never run on a
    # GPU: its tests (marker gluon) get processes of their own, so that an illegal access
    # (which poisons the CUDA context) or a hang cannot fail or stall the other tests.
    # Where the image has pytest-xdist and pytest-timeout (it had both on 2026-11-17), tests
    # run in worker processes (compiling kernels is CPU work: 16 cores) and a test past its
    # timeout ends its worker alone (xdist reports it as crashed and goes on).
    kernel_tests="tests/test_memory_read.py tests/test_gluon_forward.py
      tests/test_deterministic_backward.py tests/test_memory_read_family.py"
    has() { python3 -c "import $1" 2>/dev/null; }
    gpu_tests() {  # SECONDS_LEFT JUNIT_NAME MARKERS WORKERS TEST_TIMEOUT PYTEST_ARGS...
      if [ "$1" -gt 10 ]; then
        local parallel=() limit=()
        has xdist && parallel=(-n "$4")
        has pytest_timeout && limit=(--timeout "$5" --timeout_method thread)
        step timeout -s INT -k 20 "$1" python3 -m pytest -v -m "$3" -p no:cacheprovider \
          "${parallel[@]}" "${limit[@]}" --durations=25 --junitxml "$OUT/$2" "${@:6}"
      else echo "== no time left for $2"; fi
    }
    # shellcheck disable=SC2086
    gpu_tests $((330 - SECONDS)) gpu_tests_kernels.xml "gpu and not gluon" 8 240 $kernel_tests
    # shellcheck disable=SC2086
    gpu_tests $((450 - SECONDS)) gpu_tests_gluon.xml "gpu and gluon" 2 90 $kernel_tests
    # shellcheck disable=SC2086
    gpu_tests $((560 - SECONDS)) gpu_tests_model.xml gpu 8 240 tests \
      $(printf -- '--ignore=%s ' $kernel_tests)
    ;;
  tune)
    baseline=$(ls -d .baseline/*/ 2>/dev/null | head -1)
    # bf16 first (up to 7 minutes), fp32 in what is left; both save after every point and
    # stop on SIGINT before the call's limit.
    step timeout -s INT -k 20 $((420 - SECONDS)) python3 -m bench.tune --ns 162000 \
      --batches 1 ${baseline:+--baseline "$baseline"}
    step timeout -s INT -k 20 $((570 - SECONDS)) python3 -m bench.tune --dtype fp32 --quick \
      --ns 162000 --batches 1 ;;
  profile)
    # Where the time goes: one forward and one forward+backward at the target shape under ncu.
    # Round one launches 6 memory-read kernels (fwd, merge, fwd, merge, dv, dkdq): skip them.
    ncu --target-processes all --kernel-name regex:memory_read --launch-skip 6 --set full \
      -o "$OUT/profile" -f python3 -m bench.profile_target 2>&1 | tail -40 | tee -a "$OUT/log.txt"
    ncu --import "$OUT/profile.ncu-rep" --page details --csv > "$OUT/profile_details.csv" ;;
  kernel) step timeout -s INT -k 20 $((570 - SECONDS)) python3 -m bench kernel ;;
  video) step python3 -m bench long-video ;;
  training) step python3 -m bench training ;;
  interactive)
    step python3 -m bench interactive
    step python3 -m bench interactive-eval --sequences blackswan bmx-trees car-shadow ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
ls -l "$OUT"
