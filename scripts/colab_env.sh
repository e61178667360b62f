#!/usr/bin/env bash
# Build .venv-colab, a stand-in for Colab's GPU runtime, from colab/runtime.txt, then run the notebook's install
# step in it for real, recording `pip freeze --all` before and after (tests/test_colab_runtime.py compares them).
#
#   bash scripts/colab_env.sh          # then: .venv-colab/bin/python -m pytest -p no:xdist tests/test_colab_runtime.py
#
# Always starts from an empty .venv-colab: the install step must meet Colab's versions, not the last run's.
# Stand-ins (each explained in colab/runtime.txt): Python 3.11 for 3.13, the CPU torch 2.13.0 for the CUDA 2.11.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=.venv-colab
PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null; then
  echo "[colab-env] $PYTHON not found; falling back to python3 ($(python3 --version 2>&1))." >&2
  PYTHON=python3
fi
# Colab runs 3.13 and the stand-in is 3.11: an older Python would resolve other wheels and test another environment.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[colab-env] WARNING: $PYTHON is $("$PYTHON" --version 2>&1), older than 3.11: the environment built will not" \
    "be Colab's (set PYTHON=python3.11 or newer)." >&2
fi
started=$SECONDS
step() { echo "[colab-env $((SECONDS - started))s] $*"; }

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PINS="$VENV/colab-pins.txt"
"$VENV/bin/python" scripts/colab_runtime.py pins "$PINS"

# Colab's pip first: its resolver is the one that runs the notebook's install step there.
step "pip as Colab has it, then torch (the CPU build standing in for Colab's CUDA build)"
"${PIP[@]}" install -q "pip==$(grep -m1 '^pip==' "$PINS" | cut -d= -f3)"
# torch alone, from this machine's disk, before anything could ask for another build of it.
"${PIP[@]}" install -q --constraint "$PINS" "torch==$(grep -m1 '^torch==' "$PINS" | cut -d= -f3)"

step "Colab's versions of everything else in colab/runtime.txt"
"${PIP[@]}" install -q --constraint "$PINS" --requirement "$PINS"

# What the tests need beyond Colab's set; the constraints keep every Colab pin where it is (pip fails otherwise).
step "test tools (constrained to Colab's versions)"
"${PIP[@]}" install -q --constraint "$PINS" pytest pytest-xdist nbclient nbformat ipykernel "playwright==1.65.2" hypothesis

"${PIP[@]}" freeze --all >"$VENV/colab-freeze-before.txt"

# The notebook's install step, as its install cell runs it (not in smoke mode: this installs for real).
step "the notebook's install step: python dreambooth_helpers/colab_install.py --source $REPO"
env -u DREAMBOOTH_HELPERS_SMOKE "$VENV/bin/python" dreambooth_helpers/colab_install.py --source "$REPO" \
  2>&1 | tee "$VENV/install-step.log"

"${PIP[@]}" freeze --all >"$VENV/colab-freeze-after.txt"
step "done; what the install step changed (before -> after):"
changes=$(diff "$VENV/colab-freeze-before.txt" "$VENV/colab-freeze-after.txt" | grep '^[<>]' || true)
echo "${changes:-(nothing)}"
