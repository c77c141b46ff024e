#!/usr/bin/env bash
# Every GPU measurement this project records.
#
#   bash perf/gpu_suite.sh quick OUT_DIR [--device cpu]   # all headline figures in one call of <= 8 minutes
#   bash perf/gpu_suite.sh PART OUT_DIR                   # one part, each within 10 minutes
#
# quick (the call to make first when GPU time is short), in this order, each part under a hard
# time limit (QUICK_TOTAL_S, default 465 s, first compiles included; a part that runs out is
# stopped and the next one starts):
#   kernels    kernel tests on CUDA (compiled Triton; pytest -n 4 where pytest-xdist is there)   55 s
#   alignment  fused alignment loss fwd+bwd vs eager and torch.compile, B=256 T=256 E 768 and 1024,
#              bf16: time, GB/s against the measured copy bandwidth, peak memory                55 s
#   step-xl    SiT-XL/2 + iREPA, batch 256 (micro-batches as planned), bf16: XL_CONFIGS in order
#              (default compile+fusedloss, baseline, compile+fused): img/s, MFU, peak memory   180 s
#   step-b     JiT-B/16 + iREPA, batch 256: B_CONFIGS (default compile+fusedloss, baseline)    125 s
#   loader     the memmap loader on this host's cores (SiT-B/2 + DINOv2-B records)              30 s
# Every row is in OUT_DIR the moment it is measured (bench_*.csv), parts.csv says how each part
# ended, summary.md (rewritten after every part, printed at the end) puts each headline figure
# beside its target and its roofline prediction (perf/results/roofline.csv), suite.log holds
# all output. A run cut off from outside still leaves every finished row. Here, afterwards:
#   python perf/suite_report.py --merge OUT_DIR   # rows -> perf/results/*.csv, tables -> RESULTS.md
# --device cpu is the practice run: tiny models and shapes, the Triton interpreter, CPU budgets
# (QUICK_TOTAL_S 1650; 13 minutes on 2 cores when other jobs load them); it exercises every command
# the GPU run makes.
#
# tune OUT_DIR [--device cpu]: a follow-up when GPU time is left: block sizes of the Triton kernels
#   (perf/tune_kernels.py, every variant checked against the reference), rows in OUT_DIR/tune_kernels.csv.
#
# Parts (the older per-part entry points; results packed in OUT_DIR/results.tgz):
#   kernels   kernel tests on CUDA + bench_alignment + bench_adaln
#   step-xl   bench_step SiT-XL/2 at batch 256: baseline, eager, compile, compile+fused(+flash)
#   step-b    bench_step SiT-B/2 and JiT-B/16 at batch 256
#   loader    bench_loader on this host's cores (the 16-core figure)
#   all       the four, in that order
#   env       only the versions and nvidia-smi (a smoke test of the machine)
# Env: CONFIGS, STEPS, WARMUP, COMPILE_MODE (bench_step), XL_CONFIGS / B_CONFIGS / QUICK_TOTAL_S /
#      BUDGET_<PART> (quick), PYTHON (default python3), IREPA_COMMIT (the commit to record where the
#      tree has no .git, as on the device machine: the suite sets it from git when it can),
#      INDUCTOR_CACHE_IN (a .tgz from an earlier run's KEEP_INDUCTOR_CACHE=1: skips recompiles).
#
# Runs offline with only torch + triton + numpy + pillow + pytest: the package is imported from
# this checkout through a temporary folder of links (no install, nothing written into the tree;
# pip install -e . is the fallback). What cannot be imported is printed, and the rest still runs.
set -uo pipefail
usage="usage: bash perf/gpu_suite.sh quick|tune|kernels|step-xl|step-b|loader|all|env OUT_DIR [--device cuda|cpu]"
part=${1:?$usage}
out=${2:?$usage}
shift 2
device=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=${2:?$usage}; shift 2 ;;
        --device=*) device=${1#*=}; shift ;;
        *) echo "unknown option $1; $usage"; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "--device must be cuda or cpu, got $device"; exit 2 ;; esac
case "$part" in quick|tune|kernels|step-xl|step-b|loader|all|env) ;; *) echo "unknown part $part; $usage"; exit 2 ;; esac
[ "$device" = cuda ] || [ "$part" = quick ] || [ "$part" = tune ] || { echo "--device cpu is for quick and tune only"; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
root=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
case "$PY" in /*) ;; */*) PY=$root/$PY ;; esac  # a relative path still works from another folder
# -P: the working directory is not put on sys.path (python -m, python -), so the bare irepa/ of this
# checkout (no kernels/, no data/) never hides the linked or installed package
PYP=()
"$PY" -P -c pass 2>/dev/null && PYP=(-P)
status=0
tmp=$(mktemp -d "${TMPDIR:-/tmp}/irepa-suite.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---- import this checkout ------------------------------------------------------------------
ours() {  # irepa (kernels and data included) importable, and from this checkout
    "$PY" "${PYP[@]}" - "$root" <<'EOF' 2>/dev/null
import os, sys
import irepa, irepa.kernels, irepa.data  # noqa: E401
here = os.path.realpath(sys.argv[1]) + os.sep
sys.exit(0 if all(os.path.realpath(m.__file__).startswith(here) for m in (irepa, irepa.kernels, irepa.data)) else 3)
EOF
}
if ! ours; then
    mkdir -p "$tmp/path/irepa"
    for f in irepa/*; do ln -s "$root/$f" "$tmp/path/irepa/"; done
    ln -s "$root/kernels" "$tmp/path/irepa/kernels"
    ln -s "$root/data" "$tmp/path/irepa/data"
    export PYTHONPATH="$tmp/path${PYTHONPATH:+:$PYTHONPATH}"
    if ! ours; then
        echo "[suite] the linked package does not import; trying pip install -e ."
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . && ours \
            || { echo "[suite] irepa from this checkout cannot be imported"; exit 2; }
    fi
fi
if [ -z "${IREPA_COMMIT:-}" ] && command -v git >/dev/null && git rev-parse --short HEAD >/dev/null 2>&1; then
    IREPA_COMMIT=$(git rev-parse --short HEAD)
    [ -z "$(git status --porcelain --untracked-files=no)" ] || IREPA_COMMIT="$IREPA_COMMIT-dirty"
    export IREPA_COMMIT
fi
[ -n "${IREPA_COMMIT:-}" ] || echo "[suite] WARNING: no git here and IREPA_COMMIT unset: rows will say the commit is unknown"

# ---- what is here ----------------------------------------------------------------------------
env_report() {
    "$PY" "${PYP[@]}" - <<'EOF'
import importlib, os, platform
print(f"host {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}, "
      f"commit {os.environ.get('IREPA_COMMIT', 'unknown')}")
for name in ["torch", "triton", "numpy", "PIL", "pytest", "xdist", "irepa", "irepa.kernels", "irepa.data",
             "ffcv", "flash_attn", "flash_attn_interface", "xformers", "fire", "diffusers"]:
    try:
        m = importlib.import_module(name)
        print(f"  {name:22s} ok {getattr(m, '__version__', '')}{m.__file__ if name == 'irepa' else ''}")
    except Exception as e:  # optional ones may be missing: the parts that need them say so and skip
        print(f"  {name:22s} not importable ({type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''})")
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name() if cuda else 'none'}"
          + (f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB" if cuda else ""))
except Exception as e:
    print(f"torch: {e}")
EOF
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -20; else echo "nvidia-smi: not here"; fi
}

# ---- the older parts ----------------------------------------------------------------------------
run() {  # run NAME CMD...: tee to a log, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$out/logs/suite.log"
    "$@" 2>&1 | tee "$out/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$out/logs/suite.log"
    [ "$rc" -eq 0 ] || status=1
}

step_args=(--steps "${STEPS:-20}" --warmup "${WARMUP:-5}")
[ -n "${CONFIGS:-}" ] && step_args+=(--configs "$CONFIGS")
[ -n "${COMPILE_MODE:-}" ] && step_args+=(--compile_mode "$COMPILE_MODE")

do_kernels() {
    run kernel_tests env IREPA_KERNEL_TEST_DEVICE=cuda "$PY" "${PYP[@]}" -m pytest -q -p no:cacheprovider \
        tests/test_kernel_alignment.py tests/test_kernel_adaln.py
    run bench_alignment "$PY" perf/bench_alignment.py
    run bench_alignment_t "$PY" perf/bench_alignment.py --layout transposed
    run bench_adaln "$PY" perf/bench_adaln.py
}
do_step_xl() { run bench_step_xl "$PY" perf/bench_step.py --models SiT-XL/2 "${step_args[@]}"; }
do_step_b() { run bench_step_b "$PY" perf/bench_step.py --models SiT-B/2,JiT-B/16 "${step_args[@]}"; }
do_loader() { run bench_loader "$PY" perf/bench_loader.py; }

# ---- quick ------------------------------------------------------------------------------------------
record_part() {  # NAME STATUS SECONDS BUDGET NOTE
    [ -s "$out/parts.csv" ] || echo "part,device,status,seconds,budget,note" > "$out/parts.csv"
    local note=${5//\"/\'}
    echo "$1,$device,$2,$3,$4,\"$note\"" >> "$out/parts.csv"
}

qpart() {  # qpart NAME BUDGET_S CMD...: run under a hard limit; rows are already in OUT as they come
    local name=$1 budget=$2; shift 2
    local left=$(( deadline - $(date +%s) - 5 ))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped, ${left}s left of the ${total}s budget" | tee -a "$log"
        record_part "$name" skipped 0 "$budget" "no time left in the ${total}s budget"
        "$PY" perf/suite_report.py "$out" >/dev/null 2>>"$log"
        return
    fi
    [ "$budget" -le "$left" ] || budget=$left
    echo "=== $name (limit ${budget}s): $*" | tee -a "$log"
    local t0; t0=$(date +%s)
    local limit=(timeout --signal=TERM --kill-after=10 "$budget")
    command -v timeout >/dev/null || { limit=(); echo "[suite] no timeout command here: $name runs without its limit" | tee -a "$log"; }
    "${limit[@]}" "$@" 2>&1 | tee -a "$log" "$tmp/$name.log"
    local rc=${PIPESTATUS[0]} secs=$(( $(date +%s) - t0 )) st note
    case "$rc" in
        0) st=ok ;;
        124|137) st=timeout ;;
        *) st=failed ;;
    esac
    [ "$st" = ok ] || status=1
    if [ "$name" = kernels ]; then  # pytest's counts, also from a run stopped half-way (-v: a line per test)
        note=$(grep -E '^=+ .*[0-9]+ (passed|failed)' "$tmp/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
        [ -n "$note" ] || note="$(grep -c ' PASSED' "$tmp/$name.log") passed, $(grep -c ' FAILED' "$tmp/$name.log") failed before the stop"
    else
        note=$(grep -E 'FAILED|Error|error:' "$tmp/$name.log" | tail -1 | cut -c1-200)
    fi
    echo "=== $name: $st (exit $rc, ${secs}s)" | tee -a "$log"
    record_part "$name" "$st" "$secs" "$budget" "$note"
    "$PY" perf/suite_report.py "$out" >/dev/null 2>>"$log"
}

do_quick() {
    log=$out/suite.log
    : > "$log"
    rm -f "$out/parts.csv" "$out/summary.md" "$out"/bench_step.csv "$out"/bench_alignment.csv "$out"/bench_loader.csv
    total=${QUICK_TOTAL_S:-465}
    [ "$device" = cpu ] && total=${QUICK_TOTAL_S:-1650}
    deadline=$(( $(date +%s) + total ))
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$tmp/inductor}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}
    if [ -n "${INDUCTOR_CACHE_IN:-}" ]; then
        mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && tar xzf "$INDUCTOR_CACHE_IN" -C "$TORCHINDUCTOR_CACHE_DIR" \
            && echo "[suite] compile caches from $INDUCTOR_CACHE_IN" | tee -a "$log"
    fi
    env_report 2>&1 | tee -a "$log"
    local cpu=0; [ "$device" = cpu ] && cpu=1
    local xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
    local steps=(--steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --keep_order)
    if [ $cpu = 1 ]; then
        steps=(--steps "${STEPS:-3}" --warmup "${WARMUP:-1}" --keep_order)
        local kt=(env IREPA_KERNEL_TEST_DEVICE=cpu TRITON_INTERPRET=1)
        local align=(--device cpu --quick --shapes 2x16x64,2x16x96)
        local xl=(--device cpu --quick --models SiT-Tiny/2 --configs "${XL_CONFIGS:-compile,baseline}")
        local b=(--device cpu --quick --models JiT-Tiny/4 --configs "${B_CONFIGS:-compile,baseline}")
        local loader=(--n 256 --batch 32 --steps 16)
        local budgets=(240 200 480 540 150)
    else
        local kt=(env IREPA_KERNEL_TEST_DEVICE=cuda)
        local align=(--shapes 256x256x768,256x256x1024)
        local xl=(--models SiT-XL/2 --configs "${XL_CONFIGS:-compile+fusedloss,baseline,compile+fused}")
        local b=(--models JiT-B/16 --configs "${B_CONFIGS:-compile+fusedloss,baseline}")
        local loader=(--n 2048 --batch 256 --steps 40)
        local budgets=(55 55 180 125 30)
    fi
    qpart kernels "${BUDGET_KERNELS:-${budgets[0]}}" "${kt[@]}" "$PY" "${PYP[@]}" -m pytest -v -rfE -p no:cacheprovider \
        "${xdist[@]}" tests/test_kernel_alignment.py tests/test_kernel_adaln.py
    qpart alignment "${BUDGET_ALIGNMENT:-${budgets[1]}}" "$PY" perf/bench_alignment.py "${align[@]}" \
        --csv "$out/bench_alignment.csv"
    qpart step-xl "${BUDGET_STEP_XL:-${budgets[2]}}" "$PY" perf/bench_step.py "${xl[@]}" "${steps[@]}" \
        --csv "$out/bench_step.csv" --no_update
    qpart step-b "${BUDGET_STEP_B:-${budgets[3]}}" "$PY" perf/bench_step.py "${b[@]}" "${steps[@]}" \
        --csv "$out/bench_step.csv" --no_update
    qpart loader "${BUDGET_LOADER:-${budgets[4]}}" "$PY" perf/bench_loader.py "${loader[@]}" --loaders memmap \
        --csv "$out/bench_loader.csv"
    if [ "${KEEP_INDUCTOR_CACHE:-0}" = 1 ] && [ -d "$TORCHINDUCTOR_CACHE_DIR" ]; then
        tar czf "$tmp/cache.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>>"$log"
        if [ "$(stat -c %s "$tmp/cache.tgz")" -le $(( 15 * 2**20 )) ]; then
            mv "$tmp/cache.tgz" "$out/inductor_cache.tgz"
        else
            echo "[suite] compile caches are $(( $(stat -c %s "$tmp/cache.tgz") / 2**20 )) MiB: not kept" | tee -a "$log"
        fi
    fi
    "$PY" perf/suite_report.py "$out" 2>>"$log" | tee -a "$log"
    echo "quick: $(( $(date +%s) - deadline + total ))s; rows in $out (exit $status)"
}

do_tune() {  # a follow-up call: the kernels' block sizes (perf/tune_kernels.py), rows into OUT as measured
    log=$out/suite.log
    total=${QUICK_TOTAL_S:-300}
    deadline=$(( $(date +%s) + total ))
    env_report 2>&1 | tee -a "$log"
    local args=()
    [ "$device" = cpu ] && args=(--device cpu --quick)
    qpart tune "$total" "$PY" perf/tune_kernels.py "${args[@]}" --csv "$out/tune_kernels.csv"
    grep -E '^(alignment|adaln) B=.*: best' "$log" || echo "tune: no complete sweep (see $log)"
}

case "$part" in
    quick) do_quick; exit $status ;;
    tune) do_tune; exit $status ;;
esac
mkdir -p "$out/logs"
env_report >"$out/logs/env.txt" 2>&1
cat "$out/logs/env.txt" | tee -a "$out/logs/suite.log" | head -25
case "$part" in
    kernels) do_kernels ;;
    step-xl) do_step_xl ;;
    step-b) do_step_b ;;
    loader) do_loader ;;
    all) do_kernels; do_step_xl; do_step_b; do_loader ;;
    env) ;;
    *) echo "unknown part $part; $usage"; exit 2 ;;
esac

tar czf "$out/results.tgz" perf/results perf/RESULTS.md -C "$out" logs
echo "results: $out/results.tgz (exit $status)"
exit $status
