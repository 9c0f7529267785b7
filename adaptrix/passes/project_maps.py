"""Axis maps for the project pass: how one axis of a delta (residual, heads, neurons) goes to another size.

An axis map holds two linear maps: `push` carries a vector of the source's axis to the target's
([n_t, n_s]: an output side, B' = push @ B), `pull` reads the source's coordinates off a vector of
the target's ([n_s, n_t]: an input side, A' = A @ pull). Maps are kept sparse where they are sparse
(a truncation or a neuron matching is an index pair and a scale per kept coordinate; heads are
blocks), so no map of a large model's size is ever formed densely except by `interpolate`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaptrix.binders.table import Layout, split_rows
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.values import Site, SourceModel
from adaptrix.lowering.sites import base_sites

__all__ = [
    "AxisMap",
    "BlockMap",
    "DenseMap",
    "IndexMap",
    "factor_error",
    "factor_norm2",
    "head_pairs",
    "interpolation",
    "rope_halves",
    "truncation",
    "weight_reader",
]


class AxisMap(ABC):
    """push(B [n_s, r]) -> [n_t, r] and pull(A [r, n_s]) -> [r, n_t]; float64 tensors."""

    size_in: int
    size_out: int

    @abstractmethod
    def push(self, b: torch.Tensor) -> torch.Tensor:
        """Carry the rows of B (an output side) to the target's axis."""

    @abstractmethod
    def pull(self, a: torch.Tensor) -> torch.Tensor:
        """Carry the columns of A (an input side) to the target's axis."""

    @abstractmethod
    def back_rows(self, b: torch.Tensor) -> torch.Tensor:
        """Read an output side B [n_t, r] back in the source's coordinates: pull @ B."""

    @abstractmethod
    def back_cols(self, a: torch.Tensor) -> torch.Tensor:
        """Read an input side A [r, n_t] back in the source's coordinates: A @ push."""


@dataclass(frozen=True, slots=True)
class DenseMap(AxisMap):
    """Explicit matrices: push [n_t, n_s], pull [n_s, n_t]."""

    push_matrix: torch.Tensor
    pull_matrix: torch.Tensor

    @property
    def size_in(self) -> int:  # type: ignore[override]
        """The source's axis size."""
        return self.push_matrix.shape[1]

    @property
    def size_out(self) -> int:  # type: ignore[override]
        """The target's axis size."""
        return self.push_matrix.shape[0]

    def push(self, b: torch.Tensor) -> torch.Tensor:
        """The product push @ B."""
        return self.push_matrix @ b

    def pull(self, a: torch.Tensor) -> torch.Tensor:
        """The product A @ pull."""
        return a @ self.pull_matrix

    def back_rows(self, b: torch.Tensor) -> torch.Tensor:
        """The product pull @ B."""
        return self.pull_matrix @ b

    def back_cols(self, a: torch.Tensor) -> torch.Tensor:
        """The product A @ push."""
        return a @ self.push_matrix


@dataclass(frozen=True, slots=True)
class IndexMap(AxisMap):
    """Source coordinate `source[i]` goes to target coordinate `target[i]`, scaled; the rest is zero."""

    size_in: int
    size_out: int
    source: torch.Tensor
    target: torch.Tensor
    push_scale: torch.Tensor
    pull_scale: torch.Tensor

    @classmethod
    def identity_prefix(cls, size_in: int, size_out: int) -> IndexMap:
        """Coordinate i to coordinate i for i < min(size_in, size_out): truncate or zero-pad."""
        keep = torch.arange(min(size_in, size_out))
        ones = torch.ones(len(keep), dtype=torch.float64)
        return cls(size_in, size_out, keep, keep, ones, ones)

    def push(self, b: torch.Tensor) -> torch.Tensor:
        """Scatter the kept rows of B, scaled."""
        out = b.new_zeros((self.size_out, b.shape[1]))
        out[self.target] = b[self.source] * self.push_scale[:, None]
        return out

    def pull(self, a: torch.Tensor) -> torch.Tensor:
        """Scatter the kept columns of A, scaled."""
        out = a.new_zeros((a.shape[0], self.size_out))
        out[:, self.target] = a[:, self.source] * self.pull_scale[None, :]
        return out

    def back_rows(self, b: torch.Tensor) -> torch.Tensor:
        """The kept rows of B back at their source coordinates."""
        out = b.new_zeros((self.size_in, b.shape[1]))
        out[self.source] = b[self.target] * self.pull_scale[:, None]
        return out

    def back_cols(self, a: torch.Tensor) -> torch.Tensor:
        """The kept columns of A back at their source coordinates."""
        out = a.new_zeros((a.shape[0], self.size_in))
        out[:, self.source] = a[:, self.target] * self.push_scale[None, :]
        return out


@dataclass(frozen=True, slots=True)
class BlockMap(AxisMap):
    """Blocks of coordinates (heads): (source rows, target rows, push [bt, bs], pull [bs, bt]) each."""

    size_in: int
    size_out: int
    blocks: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...]

    def push(self, b: torch.Tensor) -> torch.Tensor:
        """Each block's push applied to its source rows of B."""
        out = b.new_zeros((self.size_out, b.shape[1]))
        for source, target, push, _ in self.blocks:
            out[target] += push @ b[source]
        return out

    def pull(self, a: torch.Tensor) -> torch.Tensor:
        """Each block's pull applied to its source columns of A."""
        out = a.new_zeros((a.shape[0], self.size_out))
        for source, target, _, pull in self.blocks:
            out[:, target] += a[:, source] @ pull
        return out

    def back_rows(self, b: torch.Tensor) -> torch.Tensor:
        """Each block's pull applied to its target rows of B."""
        out = b.new_zeros((self.size_in, b.shape[1]))
        for source, target, _, pull in self.blocks:
            out[source] += pull @ b[target]
        return out

    def back_cols(self, a: torch.Tensor) -> torch.Tensor:
        """Each block's push applied to its target columns of A."""
        out = a.new_zeros((a.shape[0], self.size_in))
        for source, target, push, _ in self.blocks:
            out[:, source] += a[:, target] @ push
        return out


def truncation(size_in: int, size_out: int) -> IndexMap:
    """Keep the overlapping coordinates, zero-pad or drop the rest."""
    return IndexMap.identity_prefix(size_in, size_out)


def interpolation(size_in: int, size_out: int) -> DenseMap:
    """Linear resampling of an axis (end points aligned) in both directions: a naive map."""
    return DenseMap(_resample(size_in, size_out), _resample(size_out, size_in))


def _resample(size_in: int, size_out: int) -> torch.Tensor:
    """[size_out, size_in]: row j linearly interpolates the input at position j * (in - 1) / (out - 1)."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    if size_in == size_out:
        return torch.eye(size_in, dtype=torch.float64)
    positions = (
        torch.linspace(0, size_in - 1, size_out, dtype=torch.float64) if size_out > 1 else torch.zeros(1)
    )
    low = positions.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = positions - low
    rows = torch.arange(size_out)
    matrix[rows, low] += 1 - frac
    matrix[rows, high] += frac
    return matrix


def rope_halves(head_in: int, head_out: int, interpolate: bool) -> torch.Tensor:
    """[head_out, head_in] within-head push for q / k: each rotary half mapped onto its own half.

    Rotary embeddings pair dimension i with i + head_dim / 2, so a head_dim change keeps the two
    halves apart (truncated / padded, or resampled, each on its own) to keep those pairs together.
    """
    half_in, half_out = head_in // 2, head_out // 2
    if head_in % 2 or head_out % 2:
        block = _resample(head_in, head_out) if interpolate else truncation(head_in, head_out).push(
            torch.eye(head_in, dtype=torch.float64))  # fmt: skip
        return block
    half = _resample(half_in, half_out) if interpolate else torch.eye(half_out, half_in, dtype=torch.float64)
    return torch.block_diag(half, half)


def head_pairs(
    source: SourceModel, target: SourceModel
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(source kv head, target kv head) and (source q head, target q head) pairs that keep GQA groups.

    kv head k goes to kv head k; q head j of source group k goes to q head j of target group k. With
    the same group size this is head h -> head h; heads past the target's counts are dropped.
    """
    group_in = source.num_heads // source.num_kv_heads
    group_out = target.num_heads // target.num_kv_heads
    kv = [(k, k) for k in range(min(source.num_kv_heads, target.num_kv_heads))]
    q = [(k * group_in + j, k * group_out + j) for k, _ in kv for j in range(min(group_in, group_out))]
    return kv, q


def head_block_map(
    pairs: Sequence[tuple[int, int]],
    head_in: int,
    head_out: int,
    heads_in: int,
    heads_out: int,
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> BlockMap:
    """A BlockMap over whole heads: pair i maps source head s to target head t by blocks[i]."""
    built = []
    for (s, t), (push, pull) in zip(pairs, blocks, strict=True):
        rows_in = torch.arange(s * head_in, (s + 1) * head_in)
        rows_out = torch.arange(t * head_out, (t + 1) * head_out)
        built.append((rows_in, rows_out, push, pull))
    return BlockMap(heads_in * head_in, heads_out * head_out, tuple(built))


def weight_reader(base: Checkpoint):
    """A function (site, param) -> the base's parameter there, canonical [out, in] (1-D: norms, biases).

    float64; None where the base has no such site or parameter. A head tied to the embedding reads it.
    """
    sites = base_sites(base)

    def read(site: Site, param: str = "weight") -> torch.Tensor | None:
        there = sites.get(site)
        if there is None:
            return None
        name = f"{there.module}.{param}"
        if base.info(name) is None and site.role == "lm_head" and param == "weight":
            name = next((f"{s.module}.weight" for k, s in sites.items() if k.role == "embed"), name)
        if base.info(name) is None:
            return None
        value = base.read(name).to(torch.float64)
        placed = base.binder.resolve(there.module)
        if placed is not None and placed.module.layout is Layout.CONV1D and value.dim() == 2:
            value = value.T
        index = split_rows(placed.module.split, base.source) if placed is not None else None
        if index is not None:
            value = value[index[placed.module.roles.index(site.role)]]
        return value

    return read


def factor_norm2(b: torch.Tensor, a: torch.Tensor) -> float:
    """|B @ A|_F^2 from the factors."""
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0))


def factor_error(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """|B1 A1 - B2 A2|_F / |B1 A1|_F from the factors (0 when the first is zero)."""
    total = factor_norm2(*first)
    if total <= 0:
        return 0.0
    diff = factor_norm2(torch.cat([first[0], -second[0]], 1), torch.cat([first[1], second[1]], 0))
    return math.sqrt(max(diff, 0.0) / total)
