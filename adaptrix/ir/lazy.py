"""LazyTensor: a tensor known by shape and origin, read and checked only when a number is needed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.finite import all_finite

__all__ = ["LazyTensor"]


@dataclass(frozen=True, slots=True, eq=False)
class LazyTensor:
    """A tensor known by shape and origin, loaded as float32 and checked when used."""

    shape: tuple[int, ...]
    origin: str
    loader: Callable[[], torch.Tensor] = field(repr=False)
    itemsize: int = 4

    @classmethod
    def of(cls, tensor: torch.Tensor, origin: str) -> LazyTensor:
        """Wrap a tensor already in memory."""
        value = tensor.detach()
        return cls(tuple(value.shape), origin, lambda: value, value.element_size())

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in its source file."""
        return self.numel * self.itemsize

    def load(self) -> torch.Tensor:
        """Read the tensor as float32; its shape must match and its values must be finite."""
        value = self.loader().to(torch.float32)
        if tuple(value.shape) != self.shape:
            raise BadInputError(f"{self.origin} has shape {list(value.shape)}, expected {list(self.shape)}")
        if not all_finite(value):
            raise BadInputError(
                f"{self.origin} holds NaN or Inf values",
                fix="the adapter is corrupt or diverged in training; re-save or retrain it",
            )
        return value

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> LazyTensor:
        """A lazy tensor computed from this one by `fn` when loaded."""
        return LazyTensor(shape, self.origin, lambda: fn(self.load()), self.itemsize)

    def rows(self, index: torch.Tensor) -> LazyTensor:
        """The rows (first dimension) picked by `index`."""
        shape = (len(index), *self.shape[1:])
        return self.map(lambda t: t.index_select(0, index), shape)

    def transposed(self) -> LazyTensor:
        """The transpose of a 2-D tensor."""
        return self.map(lambda t: t.T.contiguous(), (self.shape[1], self.shape[0]))

    def scaled(self, factor: float) -> LazyTensor:
        """Multiply by a constant, lazily."""
        return self.map(lambda t: t * factor, self.shape)
