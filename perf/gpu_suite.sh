#!/usr/bin/env bash
# Every GPU measurement this project records.
#
#   bash perf/gpu_suite.sh quick OUT_DIR [--device cpu]   # all headline figures in one call of <= 7 minutes
#   bash perf/gpu_suite.sh PART OUT_DIR                   # one part, each within 10 minutes
#
# quick: the prepared call, python -m perf.gpu_call (its docstring lists the parts, their limits and
# what they write): preflight, kernel tests, alignment loss, one bench_step process per configuration
# (the baseline first, each gated against eager and profiled once), loader; at most 7 minutes on a
# GPU. Before the call, here: python -m perf.common.provenance --write (the tree then carries its
# commit in COMMIT). Afterwards, here:
#   python -m perf.roofline --measured OUT_DIR/preflight.json --record
#   python -m perf.suite_report --merge OUT_DIR   # rows -> perf/results/*.csv, tables -> RESULTS.md
# --device cpu is the practice run: tiny models and shapes, the Triton interpreter, CPU limits.
# QUICK_TOTAL_S replaces the call's total budget.
#
# tune OUT_DIR [--device cpu]: a follow-up when GPU time is left: block sizes of the Triton kernels
#   (python -m perf.tune_kernels, every variant checked against the reference), rows in OUT_DIR/tune_kernels.csv.
#
# Parts (the older per-part entry points; results packed in OUT_DIR/results.tgz):
#   kernels   kernel tests on CUDA + bench_alignment + bench_adaln
#   step-xl   bench_step SiT-XL/2 at batch 256: baseline, eager, compile, compile+fused(+flash)
#   step-b    bench_step SiT-B/2 and JiT-B/16 at batch 256
#   loader    bench_loader on this host's cores (the 16-core figure)
#   all       the four, in that order
#   env       only the versions and nvidia-smi (a smoke test of the machine)
# Env: CONFIGS, STEPS, WARMUP, COMPILE_MODE (bench_step), QUICK_TOTAL_S (quick, tune), PYTHON
#      (default python3), IREPA_COMMIT (the commit rows record where the tree has neither .git nor a
#      COMMIT file; perf/common/provenance.py).
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
# perf/ is a package of this checkout (python -m perf.x), importable under -P through a link too
mkdir -p "$tmp/perfpath" && ln -s "$root/perf" "$tmp/perfpath/perf"
export PYTHONPATH="$tmp/perfpath${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${IREPA_COMMIT:-}" ] && command -v git >/dev/null && git rev-parse --short HEAD >/dev/null 2>&1; then
    IREPA_COMMIT=$(git rev-parse --short HEAD)
    [ -z "$(git status --porcelain --untracked-files=no)" ] || IREPA_COMMIT="$IREPA_COMMIT-dirty"
    export IREPA_COMMIT
fi
[ -n "${IREPA_COMMIT:-}" ] || [ -s COMMIT ] \
    || echo "[suite] WARNING: no git here, no COMMIT file and IREPA_COMMIT unset: rows will say the commit is unknown"

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
    run bench_alignment "$PY" "${PYP[@]}" -m perf.bench_alignment
    run bench_alignment_t "$PY" "${PYP[@]}" -m perf.bench_alignment --layout transposed
    run bench_adaln "$PY" "${PYP[@]}" -m perf.bench_adaln
}
do_step_xl() { run bench_step_xl "$PY" "${PYP[@]}" -m perf.bench_step --models SiT-XL/2 "${step_args[@]}"; }
do_step_b() { run bench_step_b "$PY" "${PYP[@]}" -m perf.bench_step --models SiT-B/2,JiT-B/16 "${step_args[@]}"; }
do_loader() { run bench_loader "$PY" "${PYP[@]}" -m perf.bench_loader; }

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
        "$PY" "${PYP[@]}" -m perf.suite_report "$out" >/dev/null 2>>"$log"
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
    "$PY" "${PYP[@]}" -m perf.suite_report "$out" >/dev/null 2>>"$log"
}

do_quick() {  # the prepared call: python -m perf.gpu_call (one process per part, each appends to call.log)
    env_report 2>&1 | tee "$out/call.log"
    local total=()
    [ -n "${QUICK_TOTAL_S:-}" ] && total=(--total_s "$QUICK_TOTAL_S")
    "$PY" "${PYP[@]}" -m perf.gpu_call "$out" --device "$device" "${total[@]}"
    status=$?
}

do_tune() {  # a follow-up call: the kernels' block sizes (perf/tune_kernels.py), rows into OUT as measured
    log=$out/suite.log
    total=${QUICK_TOTAL_S:-300}
    deadline=$(( $(date +%s) + total ))
    env_report 2>&1 | tee -a "$log"
    local args=()
    [ "$device" = cpu ] && args=(--device cpu --quick)
    qpart tune "$total" "$PY" "${PYP[@]}" -m perf.tune_kernels "${args[@]}" --csv "$out/tune_kernels.csv"
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
