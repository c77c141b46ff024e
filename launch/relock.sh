#!/usr/bin/env bash
# Renew launch/requirements.lock: a fresh virtual environment takes the newest releases that
# launch/requirements.txt admits (install.sh --latest, FFCV included), the test suite runs there,
# and only if it passes does that installed set become the lock. Review `git diff` and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"; hash -r
IREPA_WITH_FFCV=1 bash launch/install.sh --latest
python3 -m pytest -q -m "not slow" -p no:cacheprovider
python3 launch/lock.py freeze > "$work/requirements.lock"
mv "$work/requirements.lock" launch/requirements.lock
echo "[relock] launch/requirements.lock renewed; the changes:"
git --no-pager diff --stat -- launch/requirements.lock || true
