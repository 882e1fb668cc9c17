#!/usr/bin/env bash
# Creates .venv (or $MASALIGN_VENV) and installs masalign with its test extras.
# torch goes in first and pinned: on this machine kind `torch==2.13.0` resolves to a
# local CPU wheel, while any looser spec would pull several GB of CUDA packages.
# GPU users: MASALIGN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MASALIGN_VENV:-.venv}"
torch_spec="${MASALIGN_TORCH:-torch==2.13.0}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC2086  # the torch spec may carry pip options on purpose
"$venv/bin/python" -m pip install -q --disable-pip-version-check $torch_spec
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
# HookedTransformer (TransformerLens 2.x/3.x) for tests/test_transformer_lens_3.py, beside the 4.x
# that masalign installs: TransformerLens 3.9 without its dependencies (4.x has the same ones),
# in a folder that only that test's child process puts on its path.
tl3="$venv/transformer-lens-3"
[ -d "$tl3/transformer_lens" ] || "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$tl3" transformer-lens==3.9.0 better-abc==0.0.3
