"""Session fixtures: tiny models and tokenizers of two families, saved once per test session."""

from __future__ import annotations

import pytest
import torch

from tests.training.tiny import build_assets


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of the tiny teacher, student, twin student and data files (see ``tiny.py``)."""
    return build_assets(tmp_path_factory.mktemp("tiny"))
