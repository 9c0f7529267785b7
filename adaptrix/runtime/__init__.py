"""The hooks runtime: attach compiled bundles to eager PyTorch models.

Needs torch and safetensors only; it imports nothing of the compiler (peft, transformers,
onnx), so serving code can use it alone.
"""

from adaptrix.runtime.attach import Handle, attach, attached, switch
from adaptrix.runtime.bundle import Bundle, load_bundle

__all__ = ["Bundle", "Handle", "attach", "attached", "load_bundle", "switch"]
