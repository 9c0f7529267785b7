"""Shared fixtures: builders live in tests/builders.py."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from builders import build_base


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """One float32 base per (family, variant), built on first use and shared by all tests."""
    made = {}

    def get(family: str, variant: str = "default", **overrides) -> Path:
        key = (family, variant)
        if key not in made:
            path = tmp_path_factory.mktemp(f"base-{family}-{variant}")
            made[key] = build_base(family, path, **overrides)
        return made[key]

    return get
