"""The research scripts import their helpers as ``testbed_lib`` (from ``research/``, as
``python research/<script>.py`` puts it on the path); the tests do the same."""

import sys
from pathlib import Path

RESEARCH = Path(__file__).resolve().parents[2] / "research"
if str(RESEARCH) not in sys.path:
    sys.path.insert(0, str(RESEARCH))
