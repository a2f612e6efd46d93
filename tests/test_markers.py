"""The fast loop, ``pytest -m "not slow"``, leaves out every test marked ``real`` (tests/conftest.py
marks them slow too)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.training.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_tests_marked_real_count_as_slow():
    # test_real_models.py is marked `real` only; the fast loop deselects all of it.
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "-m", "not slow", "tests/training/test_real_models.py"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert re.search(r"no tests collected \(\d+ deselected\)", result.stdout), result.stdout[-2000:]
