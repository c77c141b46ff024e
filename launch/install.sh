#!/usr/bin/env bash
# Set up this checkout on a fresh machine (Debian 12 + Python 3.11 + pip): PyTorch, the
# Python dependencies in .ci/requirements.txt, and the package itself (editable).
# - An existing CUDA build of torch is kept (GPU machines); otherwise the CPU wheel
#   torch==2.13.0 is installed (a plain `pip install torch` would pull multi-GB CUDA builds).
# - IREPA_WITH_FFCV=1 also builds FFCV from source (needs apt: pkg-config, OpenCV, turbojpeg);
#   without it the prepared-data loader uses its memory-mapped numpy path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "[install] keeping CUDA torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    pip_install torch==2.13.0
fi
# keep the torch chosen above: no later step may swap it for another (multi-GB) build
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$constraints"
pip_install -c "$constraints" -r .ci/requirements.txt
if [ "${IREPA_WITH_FFCV:-0}" = "1" ] && ! "$PY" -c "import ffcv" 2>/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq pkg-config libopencv-dev libturbojpeg0-dev >/dev/null
    fi
    pip_install -c "$constraints" ffcv || echo "[install] FFCV did not build; the memmap loader will be used"
fi
pip_install --no-deps -e .
echo "[install] ready: $("$PY" -c 'import torch, irepa; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
