"""Adaptrix: a compiler for model adapters.

`import adaptrix` stays cheap: the compiler's parts load when first used.
"""

from __future__ import annotations

from adaptrix.artifacts import ADAPTRIX_VERSION

__version__ = ADAPTRIX_VERSION

__all__ = [
    "__version__",
    "attach",
    "attached",
    "calibrate_route",
    "compile_adapter",
    "convert_adapter",
    "inspect_adapter",
    "load",
    "load_bundle",
    "open_onnx",
    "parity",
    "route",
    "switch",
    "verify_artifact",
]

_API = {
    "compile_adapter": "adaptrix.api.compile",
    "load": "adaptrix.api.compile",
    "convert_adapter": "adaptrix.api.convert",
    "inspect_adapter": "adaptrix.api.inspect",
    "attach": "adaptrix.runtimes.hooks",
    "attached": "adaptrix.runtimes.hooks",
    "switch": "adaptrix.runtimes.hooks",
    "load_bundle": "adaptrix.runtimes.hooks",
    "open_onnx": "adaptrix.runtimes.onnx.session",
    "parity": "adaptrix.api.parity",
    "route": "adaptrix.api.route",
    "calibrate_route": "adaptrix.api.route_centroids",
    "verify_artifact": "adaptrix.api.verify",
}


def __getattr__(name: str):
    """Load the public API lazily."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'adaptrix' has no attribute {name!r}")
