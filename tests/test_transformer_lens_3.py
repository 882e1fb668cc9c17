"""The adapter on a real ``HookedTransformer``: ``hooked_transformer_checks.py`` under TransformerLens 3.9.

TransformerLens 4 (this environment's) has no ``HookedTransformer``, and one process
holds one ``transformer_lens``, so the checks run in a child process whose path puts
TransformerLens 3.9 first (``scripts/setup.sh`` installs it, without its dependencies,
which 4.x shares, into ``.venv/transformer-lens-3``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER_LENS_3 = Path(os.environ.get("MASALIGN_TRANSFORMER_LENS_3", ROOT / ".venv" / "transformer-lens-3"))


def test_the_adapter_checks_pass_on_a_real_hooked_transformer() -> None:
    if not (TRANSFORMER_LENS_3 / "transformer_lens").is_dir():
        pytest.skip(f"TransformerLens 3 is not at {TRANSFORMER_LENS_3}: run scripts/setup.sh")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TRANSFORMER_LENS_3), os.environ.get("PYTHONPATH")]))}
    version = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, transformer_lens; print(m.version('transformer_lens'), hasattr(transformer_lens, 'HookedTransformer'))"],
        env=environment, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert version[0].startswith("3.") and version[1] == "True", version
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "hooked_transformer_checks.py")],
        env=environment, capture_output=True, text=True, cwd=ROOT,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"{summary}\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
