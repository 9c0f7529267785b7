"""The hooks runtime: attach compiled bundles to eager PyTorch models.

Needs torch and safetensors only; it imports nothing of the compiler (peft, transformers,
onnx), so serving code can use it alone.
"""

from adaptrix.runtimes.hooks.attach import Handle, attach, attached, switch
from adaptrix.runtimes.hooks.bundle import Bundle, load_bundle

__all__ = ["Bundle", "Handle", "attach", "attached", "load_bundle", "switch"]
