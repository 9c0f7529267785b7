"""IR ops for PEFT's adapter kinds beyond LoRA: factored deltas (LoHa, LoKr) and IA3's scales.

VeRA needs no op of its own: its delta is a LowRank (the shared projections sliced and scaled by
each module's vectors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.lazy import LazyTensor

__all__ = ["FACTOR_NAMES", "SCALE_AXES", "Factored", "Scale"]

# The factor sets each kind accepts: LoHa's four; LoKr's w1 and w2, each whole or as a product.
FACTOR_NAMES = {
    "loha": (frozenset({"w1a", "w1b", "w2a", "w2b"}),),
    "lokr": tuple(
        frozenset(first | second) for first in ({"w1"}, {"w1a", "w1b"}) for second in ({"w2"}, {"w2a", "w2b"})
    ),
}
_LABELS = {"loha": "LoHa", "lokr": "LoKr"}
SCALE_AXES = ("out", "in")


@dataclass(frozen=True, slots=True, eq=False)
class Factored:
    """A dense delta that PEFT builds from small factors, in canonical [out, in] layout.

    `loha`: scale * (w1a @ w1b) * (w2a @ w2b) (Hadamard product); w1a, w2a [out, r], w1b, w2b [r, in].
    `lokr`: scale * kron(w1, w2), each factor whole (`w1`) or a product (`w1a @ w1b`); kron of
    w1 [a, c] and w2 [b, d] is [a * b, c * d] = [out, in].
    `rows`: the output rows of that delta this op holds (one role of a fused module), or None.
    """

    kind: str
    factors: Mapping[str, LazyTensor]
    scale: float
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Freeze the factors and check that they form a delta of the kind."""
        object.__setattr__(self, "factors", MappingProxyType(dict(self.factors)))
        if self.kind not in FACTOR_NAMES:
            raise ValueError(f"unknown factored kind {self.kind!r}")
        if frozenset(self.factors) not in FACTOR_NAMES[self.kind]:
            raise BadInputError(f"{self.label} factors {sorted(self.factors)} are not a known set")
        for name in ("w1", "w2"):
            self._part_shape(name)

    @property
    def label(self) -> str:
        """The kind as PEFT spells it (LoHa, LoKr)."""
        return _LABELS[self.kind]

    def _part_shape(self, name: str) -> tuple[int, int]:
        """Shape of w1 or w2 (whole or as a product), checked."""
        if name in self.factors:
            whole = self.factors[name]
            if len(whole.shape) != 2:
                raise BadInputError(f"{whole.origin} has shape {list(whole.shape)}, expected 2-D")
            return whole.shape
        a, b = self.factors[f"{name}a"], self.factors[f"{name}b"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise BadInputError(
                f"{a.origin} {list(a.shape)} and {b.origin} {list(b.shape)} do not form a product a @ b"
            )
        return (a.shape[0], b.shape[1])

    @property
    def full_shape(self) -> tuple[int, int]:
        """Shape of the whole delta before any row selection, [out, in]."""
        first, second = self._part_shape("w1"), self._part_shape("w2")
        if self.kind == "lokr":
            return (first[0] * second[0], first[1] * second[1])
        if first != second:
            raise BadInputError(f"LoHa's two products have shapes {list(first)} and {list(second)}")
        return first

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the delta this op holds, [out, in]."""
        out, inner = self.full_shape
        return (out if self.rows is None else len(self.rows), inner)

    @property
    def rank(self) -> int | None:
        """The inner rank of the products (None for a LoKr made of whole factors)."""
        inner = [t.shape[1] for name, t in self.factors.items() if name.endswith("a")]
        return max(inner) if inner else None

    def _part(self, name: str) -> torch.Tensor:
        if name in self.factors:
            return self.factors[name].load()
        return self.factors[f"{name}a"].load() @ self.factors[f"{name}b"].load()

    def delta(self) -> torch.Tensor:
        """The dense delta in float32, computed as PEFT computes it."""
        first, second = self._part("w1"), self._part("w2")
        whole = torch.kron(first, second.contiguous()) if self.kind == "lokr" else first * second
        whole = whole * self.scale
        return whole if self.rows is None else whole.index_select(0, self.rows)

    def select_rows(self, rows: torch.Tensor) -> Factored:
        """The part of the delta on some of its output rows (one role of a fused module)."""
        picked = rows if self.rows is None else self.rows.index_select(0, rows)
        return dataclasses.replace(self, rows=picked)


@dataclass(frozen=True, slots=True)
class Scale:
    """PEFT IA3: the module's weight multiplied by a vector along one axis (canonical [out, in]).

    axis `out`: W' = diag(v) W and b' = v * b, the output scaled (PEFT's non-feedforward modules).
    axis `in`: W' = W diag(v), the input scaled (PEFT's feedforward_modules); the bias unchanged.
    """

    vector: LazyTensor
    axis: str

    def __post_init__(self) -> None:
        """A known axis and a 1-D vector."""
        if self.axis not in SCALE_AXES:
            raise ValueError(f"unknown scale axis {self.axis!r}")
        if len(self.vector.shape) != 1:
            raise BadInputError(f"{self.vector.origin} has shape {list(self.vector.shape)}, expected 1-D")

    @property
    def label(self) -> str:
        """What the op is, for messages."""
        return f"IA3 scale ({'input' if self.axis == 'in' else 'output'})"

    def select_rows(self, rows: torch.Tensor) -> Scale:
        """The part acting on some output rows: the rows' entries, or the whole input vector."""
        return self if self.axis == "in" else Scale(self.vector.rows(rows), self.axis)

    def blended(self, alpha: float) -> Scale:
        """The blend (1 - alpha) * base + alpha * adapted, exact per module: v -> 1 + alpha * (v - 1)."""
        vector = self.vector.map(lambda v: 1.0 + alpha * (v - 1.0), self.vector.shape)
        return Scale(vector, self.axis)
