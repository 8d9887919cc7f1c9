#!/usr/bin/env bash
# Calls on a lent GPU machine (the device tool runs them in the repo root; results go to $OUT).
# Each stage fits one 10-minute call (STAGE_LIMIT seconds, 600 by default; pass the call's
# limit less 15 s, e.g. STAGE_LIMIT=585 with timeout_s=600).
#
# Which stage when (issues 57 and 79). A lease is 15 minutes of device time in all: the machine's start
# (1-2 minutes) and one full call, sometimes a short second one. So:
#   1. `first` is the lease's one call, what no offline work can give, in the order issue 79
#      item 5 is judged by:
#      - until mark 70 of 600: the host path's layers (bench/host_path.py), at N = 16,200 first;
#      - until mark 250: the fused read eager, planned once (prepare_read) and replayed from a
#        CUDA graph, against every peer (bench kernel: SDPA split into Ck-wide value chunks
#        with flash and with cuDNN forced, FlexAttention compiled, the chunked torch read, the
#        naive read, full-width SDPA, the same run's 8192^3 matmuls; the opt-in Gluon
#        candidates last) at the target points (bf16, B = 1, HW = 1,620, Ck = 128, Cv = 512;
#        N = 16,200 / 32,400 / 64,800 / 162,000, forward and forward + backward), each checked
#        against float64 first, the fused calls' kernel time beside their wall time, after a
#        warm-up of every series;
#      - until mark 400: the segmenter end to end (bench long-video: the official-size STM with
#        random weights at 480p, mem_every 5, bf16), eager against CUDA graphs holding the
#        read, at 50 / 200 / 1,000 frames (10 / 40 / 200 memory frames), 60 s each after a
#        5-frame warm-up;
#      - until mark 455: Cutie's own read against the fused one at 480p, 25 s each;
#      - the GPU tests: those of what has never run on a GPU (the fixed-capacity read's
#        capture, the graphed segmenter, the prepared read, the kept launches, the CUDA
#        graphs, the Gluon backward) in 4 workers until mark 515, the others in 12 until 570.
#      Budget, measured on an H100 on 2026-11-27: the warm-up of 14 series 33 s, the whole
#      peers sweep with both scaling sweeps to N = 2.6 M about 330 s, the GPU tests 120 s.
#   2. `second`, the next call (or the next lease), what `first` leaves of item 7 after the
#      self-test (about 100 s warm, 5 minutes cold: cut off at mark 240, it saves its report
#      after every check): Cutie at 1080p (60 s each), then the fused read's long video alone
#      toward 10,000 frames for what is left, its memory reserved up front (no doubling copy:
#      the peak beyond the bank is the read's own working memory).
#   3. `peers` (the whole peers sweep: the targets, then the scaling sweep to N = 2.6 M as far
#      as the time goes, saved after every point), `profile` (Nsight Compute at the target
#      shape, and on the forwards alone at N = 16,200: the DRAM and L2 bytes, tensor-pipe use
#      and occupancy of docs/kernels.md's figures table), `cutie` (Cutie at 480p and 1080p,
#      120 s per run, towards the length where its own read runs out of memory), then
#      `graphs` (the per-frame step as CUDA graphs, the read included, and with channels-last
#      weights, against eager, toward 10,000 frames).
# `first`, `second` and `cutie` need Cutie, which the machine lacks: run `python -m
# tools.gpu_session.deps` here first and pass carry=[".gpu_deps"] to the call.
#
#   bash tools/gpu_session/gpu_session.sh first      # host path, peers at the targets, long video,
#                                                    # Cutie at 480p, the GPU tests
#   bash tools/gpu_session/gpu_session.sh peers      # the peers sweep: targets, then scaling
#   bash tools/gpu_session/gpu_session.sh second     # self-test, Cutie at 1080p, the fused long video
#   bash tools/gpu_session/gpu_session.sh profile    # kernel times per pass, ncu, its summary per kernel
#   bash tools/gpu_session/gpu_session.sh cutie      # Cutie's read vs fused at 480p and 1080p
#   bash tools/gpu_session/gpu_session.sh graphs     # long video: network eager, CUDA graphs,
#                                                    # channels-last
#   bash tools/gpu_session/gpu_session.sh suspects   # memcheck on the dK/dQ tilings Triton 3.6
#                                                    # computed wrong on an H100 (bench/NOTES.md)
#   bash tools/gpu_session/gpu_session.sh tests      # GPU tests (bf16, the Gluon forward, int64 offsets)
#   bash tools/gpu_session/gpu_session.sh tune       # old vs new kernels and tilings (python -m tools.gpu_session.tune)
#   bash tools/gpu_session/gpu_session.sh kernel     # python -m bench kernel (every sweep: longer than a call)
#   bash tools/gpu_session/gpu_session.sh video      # python -m bench long-video
#   bash tools/gpu_session/gpu_session.sh training   # python -m bench training
#   bash tools/gpu_session/gpu_session.sh interactive  # python -m bench interactive + interactive-eval
#   bash tools/gpu_session/gpu_session.sh sanitize   # compute-sanitizer on the smallest Gluon cases
# "tune" compares with the kernels of an earlier commit when .baseline/ holds an export of it:
# run `python -m tools.gpu_session.baseline export REV` here first and pass carry=[".baseline"] to the call.
# The machine has torch + Triton but no internet: the package is used from the work tree.
# "tune", "kernel", "long-video" and "integrations" save their JSON as they go: a stage cut
# off by the time limit still returns what it measured (marked "complete": false).
# Every stage stops itself (SIGINT, KILL 20 s later) inside STAGE_LIMIT seconds (default 600,
# one call's limit). With less device time left than that, pass the time left less a minute,
# e.g. `STAGE_LIMIT=420 bash tools/gpu_session/gpu_session.sh kernel` with timeout_s=420: the stage then
# still ends cleanly (pytest writes its junit XML, the benchmarks their summary) instead of
# being killed by the call's limit.
set -uo pipefail
OUT=${OUT:-/tmp/stm_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 STM_BENCH_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
LIMIT=${STAGE_LIMIT:-600}
case "$LIMIT" in ''|*[!0-9]*) echo "STAGE_LIMIT must be a number of seconds, got '$LIMIT'"; exit 2 ;; esac
# Seconds from now to mark $1 of a 600-second stage, scaled to STAGE_LIMIT and at least 30 s
# before its end (the KILL that follows a SIGINT by 20 s must land inside the call too).
until_mark() {
  local mark=$(( $1 * LIMIT / 600 ))
  [ "$mark" -gt $(( LIMIT - 30 )) ] && mark=$(( LIMIT - 30 ))
  echo $(( mark - SECONDS ))
}
# timed SECONDS_LEFT COMMAND...: the command under a SIGINT at SECONDS_LEFT (KILL 20 s later),
# skipped when 10 s or less are left (timeout 0 would mean no limit at all).
timed() {
  if [ "$1" -gt 10 ]; then step timeout -s INT -k 20 "$@"
  else shift; echo "== no time left for $*"; fi
}
has() { python3 -c "import $1" 2>/dev/null; }
# The peers sweep of issue 57 (bench/kernel.py): every provider, B = 1, each series warmed up;
# the target points alone, or the targets then the scaling sweep.
PEER_OPTIONS=(--batches 1 --passes fwd fwd+bwd --warmup --max-call-s 1)
TARGETS=(python3 -m bench kernel --sweeps targets "${PEER_OPTIONS[@]}")
PEERS=(python3 -m bench kernel --sweeps targets scaling "${PEER_OPTIONS[@]}")
cutie_step() {  # SECONDS_LEFT INTEGRATIONS_ARGS...: Cutie's own read vs fused (needs .gpu_deps)
  local left=$1 deps="$PWD:$PWD/.gpu_deps"
  shift
  if PYTHONPATH="$deps" python3 -c "import cutie.model.cutie" 2>/dev/null; then
    timed "$left" env PYTHONPATH="$deps" python3 -m bench integrations --models cutie \
      --reads original fused "$@"
  else
    echo "== no Cutie here: run python -m tools.gpu_session.deps and pass carry=[\".gpu_deps\"]"
  fi
}
ncu_step() {  # NCU_MARK SUMMARY_MARK NAME PROFILE_TARGET_ARGS...: ncu on profile_target's
  # passes (only the cudaProfilerStart/Stop round, the clocks left as they are: METHOD.md) into
  # $OUT/NAME.ncu-rep, its raw metrics as CSV, their summary per kernel (ncu_summary, beside
  # the static report's predictions)
  local ncu_mark=$1 summary_mark=$2 name=$3 passes
  shift 3
  timed "$(until_mark "$ncu_mark")" ncu --target-processes all --profile-from-start off \
    --clock-control none --kernel-name regex:memory_read --set full -o "$OUT/$name" -f \
    python3 -m tools.gpu_session.profile_target "$@"
  if [ -f "$OUT/$name.ncu-rep" ]; then
    ncu --import "$OUT/$name.ncu-rep" --page raw --csv --print-units base \
      > "$OUT/${name}_raw.csv"
    passes=$(ls -t "$OUT"/profile_passes_*.json 2>/dev/null | head -1)
    timed "$(until_mark "$summary_mark")" python3 -m tools.gpu_session.ncu_summary \
      "$OUT/${name}_raw.csv" ${passes:+--passes "$passes"}
  else echo "== no ncu report for $name: see log.txt"; fi
}
gpu_tests() {  # SECONDS_LEFT JUNIT_NAME MARKERS WORKERS TEST_TIMEOUT PYTEST_ARGS...
  local parallel=() limit=()
  has xdist && parallel=(-n "$4")
  has pytest_timeout && limit=(--timeout "$5" --timeout_method thread)
  timed "$1" python3 -m pytest -v -m "$3" -p no:cacheprovider \
    "${parallel[@]}" "${limit[@]}" --durations=25 --junitxml "$OUT/$2" "${@:6}"
}
case "${1:-tests}" in
  first)
    # The one call of a 15-minute lease (header; issue 79 item 5): the host path's layers
    # (their kernels' compiles on a fresh machine, then about 20 s; saved after every row),
    # the fused read eager, planned (prepare_read) and graphed against every peer at
    # N = 16,200 / 32,400 / 64,800 / 162,000, forward and forward + backward, wall and kernel
    # time (the Gluon backward candidate last: it has never run on a GPU), the segmenter end
    # to end at 480p (official size, random weights) eager against graphed with 10 / 40 / 200
    # memory frames (50 / 200 / 1,000 frames at mem_every 5; the graphs hold the read), Cutie
    # at 480p, the GPU tests.
    timed "$(until_mark 70)" python3 -m bench host-path --ns 16200 1620
    timed "$(until_mark 250)" "${TARGETS[@]}"
    timed "$(until_mark 400)" python3 -m bench long-video --variants fused fused-graphs \
      --lengths 50 200 1000 --mem-every 5 --time-limit 60 --warmup 5
    cutie_step "$(until_mark 455)" --size 480 854 --lengths 1000 3000 10000 --time-limit 25
    # the 8-bit memory's fused forward (int8, fp8) beside the bf16 one, errors checked first
    timed "$(until_mark 480)" python3 -m bench quantized-read --device cuda --captures 0 \
      --sizes 16200 162000 --rounds 3
    # the tests of what has never run on a GPU first, in a pytest run of their own (pytest
    # collects overlapping paths in tree order, not in the order given), then the rest
    new_tests="tests/kernels/test_fixed_capacity_gpu.py tests/inference/test_segmenter_cuda_graphs.py
      tests/kernels/test_prepared_read.py tests/kernels/test_prepared_launch_gpu.py
      tests/kernels/test_cuda_graphs.py tests/kernels/test_gluon_backward.py
      tests/kernels/test_gluon_backward_dv.py"
    # shellcheck disable=SC2086
    gpu_tests "$(until_mark 515)" gpu_tests_new.xml gpu 4 60 $new_tests
    # shellcheck disable=SC2086
    gpu_tests "$(until_mark 570)" gpu_tests.xml gpu 12 90 tests \
      $(printf -- '--ignore=%s ' $new_tests) ;;
  peers)
    # The whole peers sweep: the targets, then the scaling sweep to N = 2.6 M as far as the
    # time goes (saved after every point).
    timed "$(until_mark 570)" "${PEERS[@]}" ;;
  second)
    # The next call: the self-test, Cutie at 1080p (issue 57 item 7; `first` ran 480p), the
    # fused read's long video alone (official size, 480p, mem_every 5) toward 10,000 frames.
    timed "$(until_mark 240)" python3 -m stm_kernels.selftest --json "$OUT/selftest.json"
    cutie_step "$(until_mark 400)" --size 1080 1920 --lengths 300 1000 3000 --time-limit 60
    timed "$(until_mark 570)" python3 -m bench long-video --variants fused \
      --lengths 100 300 1000 3000 10000 --mem-every 5 --warmup 5 --reserve-memory ;;
  cutie)
    # Cutie's own read against the fused one at 480p and 1080p (issue 57 item 7), 120 s a run.
    cutie_step "$(until_mark 290)" --size 480 854 --lengths 1000 3000 10000 30000 \
      --time-limit 120
    cutie_step "$(until_mark 570)" --size 1080 1920 --lengths 300 1000 3000 10000 \
      --time-limit 120 ;;
  graphs)
    # The segmenter's per-frame step replayed as CUDA graphs (compile={"mode":
    # "reduce-overhead"}: query encoder, read over the bank's capacity, decoder, memory
    # encoder) and with channels-last weights, against eager as given: the official-size STM at 480p,
    # mem_every 5, fused read, 110 s each after a warm-up (the graphs' compile and recording:
    # a minute or two).
    timed "$(until_mark 570)" python3 -m bench long-video --variants fused fused-graphs \
      fused-channels-last --lengths 100 300 1000 3000 10000 --mem-every 5 --time-limit 110 \
      --warmup 5 ;;
  suspects)
    # The dK/dQ tilings that gave wrong gradients (and one an illegal address) on an H100
    # under Triton 3.6, each under memcheck at a small N: an out-of-bounds access is named
    # there, a miscompile is not (tune's error column still shows it).
    timed "$(until_mark 570)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 STM_SANITIZER=memcheck \
      compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
      python3 -m tools.gpu_session.tune --ns 16200 --batches 1 --only \
      "dkdq block_n=64,block_m=16,num_warps=4,num_stages=2,stream_keys" \
      "dkdq block_n=64,block_m=16,num_warps=4,num_stages=1,block_cv=64,stream_keys=False" \
      "dkdq block_n=64,block_m=16,num_warps=4,num_stages=1,block_cv=32,stream_keys=False" ;;
  tests)
    # The kernels' tests first, then the Gluon forward's, then the rest, one line per test;
    # SIGINT before the stage's limit: pytest then stops cleanly and still writes its
    # junit XML (per-test outcomes and times, to commit beside the benchmark JSON), and KILL
    # 20 s later if a hung kernel keeps it from stopping. The Gluon forward has never run on a
    # GPU: its tests (marker gluon) get processes of their own, so that an illegal access
    # (which poisons the CUDA context) or a hang cannot fail or stall the other tests.
    # Where the image has pytest-xdist and pytest-timeout (it had both on 2026-11-17), tests
    # run in worker processes (compiling kernels is CPU work: 16 cores) and a test past its
    # timeout ends its worker alone (xdist reports it as crashed and goes on).
    kernel_tests="tests/kernels/test_memory_read.py tests/kernels/test_gluon_forward.py
      tests/kernels/test_gluon_backward.py tests/kernels/test_gluon_backward_dv.py
      tests/kernels/test_deterministic_backward.py tests/kernels/test_memory_read_family.py"
    # shellcheck disable=SC2086
    gpu_tests "$(until_mark 330)" gpu_tests_kernels.xml "gpu and not gluon" 8 240 $kernel_tests
    # shellcheck disable=SC2086
    gpu_tests "$(until_mark 450)" gpu_tests_gluon.xml "gpu and gluon" 2 90 $kernel_tests
    # shellcheck disable=SC2086
    gpu_tests "$(until_mark 560)" gpu_tests_model.xml gpu 8 240 tests \
      $(printf -- '--ignore=%s ' $kernel_tests)
    ;;
  tune)
    baseline=$(ls -d .baseline/*/ 2>/dev/null | head -1)
    # bf16 first (up to 7 minutes), fp32 in what is left; both save after every point and
    # stop on SIGINT before the call's limit.
    timed "$(until_mark 420)" python3 -m tools.gpu_session.tune --ns 162000 \
      --batches 1 ${baseline:+--baseline "$baseline"}
    timed "$(until_mark 570)" python3 -m tools.gpu_session.tune --dtype fp32 --quick \
      --ns 162000 --batches 1 ;;
  profile)
    # Where the time goes, at the target shape, in three steps that each keep their files:
    # (1) kernel times per pass by torch.profiler, which needs no hardware counters (ncu
    # cannot read them on every machine: KINDS.md); (2) ncu on one round of every pass
    # (tools.gpu_session.profile_target brackets it with cudaProfilerStart/Stop), the clocks left as they
    # are (METHOD.md); (3) the report's raw metrics as CSV, summarised per kernel beside the
    # static work report's L2 bytes (tools.gpu_session.ncu_summary).
    # (0) the same breakdown at N = 16,200 (ten memory frames), where the forward's time is
    # flat from N = 1,620 on (H200): kernel time against the op's wall time (issue 57 item 3).
    # (1') the forwards alone at three more memory sizes (2, 20 and 40 frames), then each
    # kernel's time fitted against N over the five, a fixed part and a part per memory frame,
    # and drawn (<last file>_fit.png) (the forward kernel's fixed ~27 us per program at 16,200
    # and 162,000 on an H100, drawn through two points only).
    # (2') ncu at N = 16,200 on the forward passes alone first (the plain and the Gluon
    # forward: at ten memory frames the forward kernel ran 27% below its N = 162,000 rate).
    timed "$(until_mark 70)" python3 -m tools.gpu_session.profile_target --breakdown --n 16200
    timed "$(until_mark 150)" python3 -m tools.gpu_session.profile_target --breakdown
    timed "$(until_mark 185)" python3 -m tools.gpu_session.profile_target --breakdown \
      --n 3240 32400 64800 --passes forward "forward (Gluon)"
    step python3 -m tools.gpu_session.profile_target --fit "$OUT"/kernel_breakdown_*.json
    ncu_step 240 260 profile_16200 --n 16200 --passes forward "forward (Gluon)"
    ncu_step 510 570 profile ;;
  kernel) timed "$(until_mark 570)" python3 -m bench kernel ;;
  sanitize)
    # Where the gluon tests fail: compute-sanitizer on the smallest Gluon case of each bf16
    # tiling of the forward and of the dK/dQ kernel, memcheck (out-of-bounds and misaligned
    # accesses; PyTorch's caching allocator off, or an access past a tensor lands in a pooled
    # block unseen) then synccheck (barrier misuse). It reads the device only on Firecracker
    # machines (KINDS.md).
    for tool in memcheck synccheck; do
      mark=330; [ "$tool" = synccheck ] && mark=570
      timed "$(until_mark $mark)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool "$tool" --target-processes all --error-exitcode 3 --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider -m "gpu and gluon" \
        tests/kernels/test_gluon_forward.py tests/kernels/test_gluon_backward.py \
        tests/kernels/test_gluon_backward_dv.py \
        -k "test_gpu_matches_reference and 45-111 and not fp16 and not num-p-3"
    done ;;
  video) step python3 -m bench long-video ;;
  training) step python3 -m bench training ;;
  interactive)
    step python3 -m bench interactive
    step python3 -m bench interactive-eval --sequences blackswan bmx-trees car-shadow ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
ls -l "$OUT"
