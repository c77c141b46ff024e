#!/usr/bin/env bash
# Every GPU measurement this project records, in parts that each fit a 10-minute slot.
#
#   bash perf/gpu_suite.sh PART OUT_DIR
#
# PART (in the order to run them when GPU time is short):
#   kernels   kernel tests on CUDA (compiled Triton, no interpreter) + bench_alignment + bench_adaln
#   step-xl   bench_step SiT-XL/2 at batch 256: baseline, eager, compile, compile+fused(+flash)
#   step-b    bench_step SiT-B/2 and JiT-B/16 at batch 256
#   loader    bench_loader on this host's cores (the 16-core figure)
#   all       the four, in that order
#   env       only the versions and nvidia-smi (a smoke test of the machine)
# Env: CONFIGS (bench_step --configs list), STEPS / WARMUP (bench_step timed / untimed steps),
#      COMPILE_MODE (bench_step --compile_mode, e.g. max-autotune-no-cudagraphs with CONFIGS=compile+fused).
#
# Works offline on a machine that has torch + triton (installs this checkout with --no-deps;
# fire / diffusers / ffcv are not needed). The benchmarks append to perf/results/*.csv and
# rewrite their tables in perf/RESULTS.md in this checkout, as they always do; at the end
# OUT_DIR/results.tgz holds perf/results, perf/RESULTS.md and the logs, to unpack over the
# repository the run came from (`tar xzf results.tgz perf`; logs/ holds the logs). Each part exits non-zero if any of
# its commands failed, after running the rest.
set -uo pipefail
part=${1:?usage: bash perf/gpu_suite.sh kernels|step-xl|step-b|loader|all|env OUT_DIR}
out=${2:?usage: bash perf/gpu_suite.sh PART OUT_DIR}
mkdir -p "$out/logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

run() {  # run NAME CMD...: tee to a log, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$out/logs/suite.log"
    "$@" 2>&1 | tee "$out/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$out/logs/suite.log"
    [ "$rc" -eq 0 ] || status=1
}

python3 -c "import irepa.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "install of this checkout failed"; exit 2; }
python3 - <<'EOF' | tee -a "$out/logs/suite.log"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
nvidia-smi >"$out/logs/nvidia-smi.txt" 2>&1 || true

step_args=(--steps "${STEPS:-20}" --warmup "${WARMUP:-5}")
[ -n "${CONFIGS:-}" ] && step_args+=(--configs "$CONFIGS")
[ -n "${COMPILE_MODE:-}" ] && step_args+=(--compile_mode "$COMPILE_MODE")

do_kernels() {
    run kernel_tests env IREPA_KERNEL_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernel_alignment.py tests/test_kernel_adaln.py
    run bench_alignment python3 perf/bench_alignment.py
    run bench_alignment_t python3 perf/bench_alignment.py --layout transposed
    run bench_adaln python3 perf/bench_adaln.py
}
do_step_xl() { run bench_step_xl python3 perf/bench_step.py --models SiT-XL/2 "${step_args[@]}"; }
do_step_b() { run bench_step_b python3 perf/bench_step.py --models SiT-B/2,JiT-B/16 "${step_args[@]}"; }
do_loader() { run bench_loader python3 perf/bench_loader.py; }

case "$part" in
    kernels) do_kernels ;;
    step-xl) do_step_xl ;;
    step-b) do_step_b ;;
    loader) do_loader ;;
    all) do_kernels; do_step_xl; do_step_b; do_loader ;;
    env) ;;
    *) echo "unknown part $part"; exit 2 ;;
esac

tar czf "$out/results.tgz" perf/results perf/RESULTS.md -C "$out" logs
echo "results: $out/results.tgz (exit $status)"
exit $status
