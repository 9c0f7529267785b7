"""Calibration: load a model, read and run prompts, collect module inputs (refit, distill, GPTQ, parity)."""
