"""The AdapterHub frontend: adapter_config.json and pytorch_adapter.bin / adapter.safetensors -> IR."""
