"""What users import at serving time: hooks/ (torch + safetensors) and onnx/ (onnxruntime)."""
