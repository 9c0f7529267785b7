"""bitsandbytes, imported for a quantized base: once, on first use or ahead on a thread.

Its import wraps a few kernels in torch.compile, which imports inductor (600 modules: seconds,
more than merging a 1B model); and the first call of any of its kernels (custom ops) imports
torch._dynamo (about 1 s). Both are kept off a merge's path where they can be (bnb_cpu.py calls
the 4-bit kernel without the custom op).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from functools import partial, wraps

import torch

from adaptrix.ir.errors import UnsupportedError

__all__ = ["FIX_BNB", "bnb_functional", "check_bnb", "import_ahead"]

FIX_BNB = "pip install 'adaptrix[qlora]' (bitsandbytes >= 0.46)"
_IMPORT_LOCK = threading.Lock()


def check_bnb() -> None:
    """A missing bitsandbytes is an error at once (it is imported for the first weight read)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedError("a bitsandbytes-quantized base needs the bitsandbytes package", fix=FIX_BNB)


def bnb_functional():
    """bitsandbytes.functional, imported on first use (a quantized base needs it).

    Its import wraps a few kernels in torch.compile, which imports inductor (600 modules: seconds,
    more than merging a 1B model). While it imports, torch.compile defers that to a wrapped
    function's first call (each is compiled then, as bitsandbytes asked); the CPU kernels a merge
    calls are not among them.
    """
    check_bnb()
    with _IMPORT_LOCK:
        if "bitsandbytes.functional" in sys.modules:
            return sys.modules["bitsandbytes.functional"]
        real, torch.compile = torch.compile, partial(_compile_on_first_call, torch.compile)
        try:
            return importlib.import_module("bitsandbytes.functional")
        except ImportError as exc:
            raise UnsupportedError(f"bitsandbytes does not import ({exc})", fix=FIX_BNB) from None
        finally:
            torch.compile = real


def import_ahead(dynamo: bool = False) -> None:
    """Import bitsandbytes on a thread, and with `dynamo` torch._dynamo (its kernels' first call does).

    About 2 s of imports on the merge's path otherwise; meanwhile the caller plans the merge and
    the hashing thread reads the base. 4-bit weights are dequantized by bitsandbytes' C kernel
    called directly (bnb_cpu.py), which needs no torch._dynamo; 8-bit ones go through its torch
    op. A failure here is left for the first real use to raise.
    """

    def run() -> None:
        try:
            bnb_functional()
            if dynamo:
                importlib.import_module("torch._dynamo")
        except (ImportError, UnsupportedError):
            pass  # raised again, in the caller's thread, by the first dequantization

    if "bitsandbytes.functional" not in sys.modules or (dynamo and "torch._dynamo" not in sys.modules):
        threading.Thread(target=run, name="adaptrix-import-bnb", daemon=True).start()


def _compile_on_first_call(compile_, fn=None, **options):
    """torch.compile(fn, **options), run when the returned function is first called."""
    if fn is None:
        return partial(_compile_on_first_call, compile_, **options)
    compiled = []

    @wraps(fn)
    def call(*args, **kwargs):
        if not compiled:
            compiled.append(compile_(fn, **options))
        return compiled[0](*args, **kwargs)

    return call
