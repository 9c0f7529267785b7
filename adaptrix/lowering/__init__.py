"""Lowering: IR + base -> per-module deltas (merge math, touched modules, low-rank pairs).

Shared by the targets and by the passes that train.
"""
