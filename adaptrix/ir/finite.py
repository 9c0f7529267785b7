"""One finiteness check for tensors read from files (adapters, bundles)."""

from __future__ import annotations

import torch

__all__ = ["all_finite"]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: a sum is finite only if every element is (the full check runs only on doubt)."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
