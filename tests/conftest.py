"""Shared fixtures: builders live in tests/builders.py, tests/onnx_builders.py and tests/pass_builders.py."""

import atexit
import os
import shutil
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

import torch
from builders import FAMILIES, ONNX_EXPORT_MISSING, build_base, exports_onnx, make_adapter, pair_of

atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)  # its caches: ~100 MB

# The asserts of the shared check helpers report their values as a test's own do.
pytest.register_assert_rewrite("onnx_builders", "pass_builders")


def pytest_collection_modifyitems(config, items):
    """Tests marked onnx_export skip where optimum's ONNX exporter is not installed (transformers 5)."""
    if not exports_onnx():
        for item in items:
            if item.get_closest_marker("onnx_export"):
                item.add_marker(pytest.mark.skip(reason=ONNX_EXPORT_MISSING))


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


@pytest.fixture(scope="session")
def peft_adapters(bases, tmp_path_factory):
    """make_adapter(family, bases(family), ...) once per (family, keywords), torch seeded; shared."""
    made = {}

    def get(family: str, **kwargs) -> Path:
        kwargs = {"seed": 1, "target_modules": list(FAMILIES[family].targets), **kwargs}
        key = (family, repr(sorted(kwargs.items())))
        if key not in made:
            torch.manual_seed(kwargs["seed"])  # PEFT draws the LoRA weights from the global generator
            path = tmp_path_factory.mktemp(f"adapter-{family}")
            made[key] = make_adapter(family, bases(family), path, **kwargs)
        return made[key]

    return get


@pytest.fixture(scope="session")
def lora_pair(bases, peft_adapters):
    """A llama base and two LoRA adapters of it of ranks 4 and 2 (full rank 6)."""
    return bases("llama"), *pair_of(peft_adapters, "llama")
