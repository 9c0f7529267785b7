"""The ONNX runtime helpers: open an Adaptrix ONNX artifact with onnxruntime, load its adapter files."""
