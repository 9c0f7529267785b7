"""Shared fixtures: builders live in tests/builders.py."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Adaptrix's sha256 cache goes to a throwaway folder, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="adaptrix-test-cache-")

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
