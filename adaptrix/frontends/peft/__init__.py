"""The PEFT frontend: adapter_config.json and adapter weights -> IR."""
