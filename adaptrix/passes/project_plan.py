"""Which map each axis of a delta takes in the project pass, per method, and svd's target subspaces.

An axis kind names what a side of a delta indexes: `res` the residual stream, `u:ROLE` the output of
the norm ROLE (the input of the modules after it), `q` / `k` / `v` the heads of those projections'
outputs, `z` the concatenated head outputs that o_proj reads, `gate` / `up` / `ff` the MLP neurons.
"""

from __future__ import annotations

import torch

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import Role, Site, SourceModel
from adaptrix.passes.project_align import Alignment
from adaptrix.passes.project_maps import (
    AxisMap,
    DenseMap,
    _resample,
    head_block_map,
    head_pairs,
    interpolation,
    rope_halves,
    truncation,
)

__all__ = ["AlignedPlan", "GeometricPlan", "Subspaces"]

_ROPE_KINDS = frozenset({"q", "k"})
_DEAD = 1e-6  # a head / neuron / direction under this share of the largest is unused


class GeometricPlan:
    """truncate / interpolate: maps from the two models' dimensions alone (no weights)."""

    def __init__(self, source: SourceModel, target: SourceModel, interpolate: bool):
        self.source, self.target, self.interpolate = source, target, interpolate
        self._maps: dict[str, AxisMap] = {}

    def axis(self, kind: str, layer: int | None) -> AxisMap:
        """The map of an axis kind (the same on every layer)."""
        key = "res" if kind.startswith("u:") else kind
        if key not in self._maps:
            self._maps[key] = self._build(key)
        return self._maps[key]

    def _build(self, kind: str) -> AxisMap:
        s, t = self.source, self.target
        if kind == "res":
            return self._line(s.hidden_size, t.hidden_size)
        if kind in ("gate", "up", "ff"):
            return self._line(s.intermediate_size, t.intermediate_size)
        kv = kind in ("k", "v")
        heads_s, heads_t = (s.num_kv_heads, t.num_kv_heads) if kv else (s.num_heads, t.num_heads)
        hs, ht = s.head_dim, t.head_dim
        rope = kind in _ROPE_KINDS
        if self.interpolate:
            within = (rope_halves(hs, ht, True), rope_halves(ht, hs, True)) if rope else (
                _resample(hs, ht), _resample(ht, hs))  # fmt: skip
            across = (_resample(heads_s, heads_t), _resample(heads_t, heads_s))
            return DenseMap(torch.kron(across[0], within[0]), torch.kron(across[1], within[1]))
        block = rope_halves(hs, ht, False) if rope else torch.eye(ht, hs, dtype=torch.float64)
        kv_pairs, q_pairs = head_pairs(s, t)
        pairs = kv_pairs if kv else q_pairs
        return head_block_map(pairs, hs, ht, heads_s, heads_t, [(block, block.T)] * len(pairs))

    def _line(self, size_in: int, size_out: int) -> AxisMap:
        return interpolation(size_in, size_out) if self.interpolate else truncation(size_in, size_out)


class AlignedPlan:
    """svd with source=: the maps an Alignment of the two models' weights gives."""

    def __init__(self, alignment: Alignment):
        self.alignment = alignment

    def axis(self, kind: str, layer: int | None) -> AxisMap:
        """The aligned map of an axis kind on a layer."""
        if kind == "res":
            return self.alignment.residual
        if kind.startswith("u:"):
            return self.alignment.norm_map(Site(layer, Role(kind[2:])))
        return self.alignment.layer(layer)[kind]  # type: ignore[return-value]


class Subspaces:
    """The parts of each target axis that the target's weights use, for svd's projection.

    Residual stream: the left singular directions of everything that writes it (the embedding,
    every o_proj and down_proj), as many as hold `energy` of their squared singular values and
    above 1e-6 of the largest singular value. Heads and neurons (privileged units): those whose
    output weights (o_proj columns, down_proj columns) are not all zero; a kv head is used when one
    of its query heads is. Directions outside these are never written, or read as zero, by the target.
    """

    def __init__(self, read, target: SourceModel, energy: float):
        self.read, self.target, self.energy = read, target, energy
        self._cache: dict[tuple[str, int | None], torch.Tensor | None] = {}
        self.residual_kept: int | None = None

    def project_rows(self, kind: str, layer: int | None, b: torch.Tensor) -> torch.Tensor:
        """B [n, r] with each column projected onto the kind's used subspace."""
        basis = self._basis(kind, layer)
        if basis is None:
            return b
        return b * basis[:, None] if basis.dtype == torch.bool else basis @ (basis.T @ b)

    def project_cols(self, kind: str, layer: int | None, a: torch.Tensor) -> torch.Tensor:
        """A [r, n] with each row projected onto the kind's used subspace."""
        basis = self._basis(kind, layer)
        if basis is None:
            return a
        return a * basis[None, :] if basis.dtype == torch.bool else (a @ basis) @ basis.T

    def _basis(self, kind: str, layer: int | None) -> torch.Tensor | None:
        key = (kind, None if kind == "res" else layer)
        if key not in self._cache:
            self._cache[key] = self._build(kind, layer)
        return self._cache[key]

    def _build(self, kind: str, layer: int | None) -> torch.Tensor | None:
        if kind == "res":
            return self._residual()
        if kind.startswith("u:"):
            residual, gain = self._basis("res", None), self.read(Site(layer, Role(kind[2:])))
            if residual is None or gain is None:
                return residual
            basis, _ = torch.linalg.qr(gain[:, None] * residual)
            return basis
        t = self.target
        if kind in ("gate", "up", "ff"):
            down = self._weight(layer, Role.MLP_DOWN)
            return _coordinates(down.norm(dim=0))
        heads = self._weight(layer, Role.ATTN_O).reshape(t.hidden_size, t.num_heads, t.head_dim)
        alive = heads.square().sum((0, 2)).sqrt()
        alive = alive > _DEAD * max(float(alive.max()), 1e-30)
        if kind in ("k", "v"):
            alive = alive.reshape(t.num_kv_heads, -1).any(1)
        return _coordinates(alive.double().repeat_interleave(t.head_dim))

    def _weight(self, layer: int | None, role: Role) -> torch.Tensor:
        weight = self.read(Site(layer, role))
        if weight is None:
            raise BadInputError(
                f"the base has no {role} weight on layer {layer}",
                fix="carry the adapter with method=truncate, or run redistribute first",
            )
        return weight

    def _residual(self) -> torch.Tensor | None:
        gram = None
        writers = [Site(None, Role.EMBED)]
        writers += [Site(layer, role) for layer in range(self.target.num_layers)
                    for role in (Role.ATTN_O, Role.MLP_DOWN)]  # fmt: skip
        for site in writers:
            weight = self.read(site)
            if weight is None:
                continue
            columns = weight.T if site.role is Role.EMBED else weight  # [hidden, ...]
            part = columns @ columns.T / max(float(columns.square().sum()), 1e-30)
            gram = part if gram is None else gram + part
        if gram is None:
            return None
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        share = torch.cumsum(values, 0) / values.sum()
        wanted = torch.tensor(self.energy * (1 - 1e-12), dtype=share.dtype)
        keep = min(int(torch.searchsorted(share, wanted)) + 1, len(values))
        keep = min(keep, int((values.sqrt() > _DEAD * values[0].sqrt()).sum()))
        self.residual_kept = keep
        return None if keep == len(values) else vectors[:, :keep]


def _coordinates(weight: torch.Tensor) -> torch.Tensor | None:
    """A mask of the coordinates whose weight is above the dead threshold (None: all of them)."""
    alive = weight > _DEAD * max(float(weight.max()), 1e-30)
    return None if bool(alive.all()) else alive
