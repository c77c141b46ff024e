#!/usr/bin/env bash
# Set up this checkout in the current Python environment (a virtual environment is best):
# PyTorch, the dependencies, and the package itself (editable).
#
#   bash launch/install.sh            # the exact versions in launch/requirements.lock (tested together)
#   bash launch/install.sh --latest   # the newest releases launch/requirements.txt admits (or IREPA_DEPS=latest)
#
# - A CUDA build of torch already installed (a GPU machine's own) is kept, with the Triton and
#   nvidia-* packages that came with it; everything else still takes the locked versions.
#   Otherwise the lock's CPU wheel is installed (a plain `pip install torch` pulls a multi-GB
#   CUDA build).
# - IREPA_WITH_FFCV=1 also builds FFCV from source (apt: pkg-config, OpenCV, turbojpeg, installed
#   here when missing); without it the prepared-data loader uses its memory-mapped numpy path.
# - Renew the lock: bash launch/relock.sh. Check an environment against it: python3 launch/lock.py check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${IREPA_DEPS:-locked}
for arg in "$@"; do
    case "$arg" in
        --latest) mode=latest ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option '$arg' (the one option is --latest)" >&2; exit 2 ;;
    esac
done
case "$mode" in locked|latest) ;; *) echo "install.sh: IREPA_DEPS=$mode: expected locked or latest" >&2; exit 2 ;; esac
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "[install] keeping CUDA torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
else
    pip_install "$("$PY" launch/lock.py torch)"
fi
# every later step keeps that torch (no multi-GB swap) and, locked, takes the lock's versions
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
if [ "$mode" = latest ]; then
    echo "[install] newest releases (launch/requirements.txt), not the lock"
    "$PY" launch/lock.py constraints --latest > "$constraints"
else
    "$PY" launch/lock.py constraints > "$constraints"
fi
pip_install -c "$constraints" -r launch/requirements.txt
if [ "${IREPA_WITH_FFCV:-0}" = "1" ] && ! "$PY" -c "import ffcv" 2>/dev/null; then
    if ! { pkg-config --exists opencv4 && pkg-config --exists libturbojpeg; } 2>/dev/null && command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev >/dev/null
    fi
    pip_install -c "$constraints" ffcv || echo "[install] FFCV did not build; the memmap loader will be used"
fi
pip_install --no-deps -e .
if [ "$mode" = locked ]; then
    rc=0; "$PY" launch/lock.py check || rc=$?
    [ "$rc" != 1 ] || exit 1  # 2: another platform than the lock's, reported and accepted
fi
echo "[install] ready: $("$PY" -c 'import torch, irepa; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
