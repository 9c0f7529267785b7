"""The hooks target: a bundle of per-module deltas for adaptrix.attach."""
