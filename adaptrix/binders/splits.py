"""How a fused module's output rows divide into roles: blocked, per head, or grouped by kv head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptrix.ir.values import SourceModel

__all__ = ["Split", "fuse_rows", "split_rows"]


@dataclass(frozen=True, slots=True)
class Split:
    """How a fused module's output rows divide into roles.

    `blocked`: consecutive blocks whose sizes name SourceModel properties.
    `headwise`: per head, the roles interleaved, each head_dim rows (GPT-NeoX query_key_value).
    `grouped`: per key/value head, its num_heads / num_kv_heads query heads, then its key head and
    its value head (Falcon's query_key_value, GPTBigCode's c_attn): with one kv head that is
    q | k | v in blocks (multi-query), with as many kv heads as heads it is `headwise`.
    """

    kind: str
    sizes: tuple[str, ...] = ()


def split_rows(split: Split | None, source: SourceModel) -> list[torch.Tensor] | None:
    """Row indices of each role inside a fused module's output, or None when not fused."""
    if split is None:
        return None
    if split.kind == "blocked":
        sizes = [int(getattr(source, name)) for name in split.sizes]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [torch.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    if split.kind == "headwise":
        parts, head_dim = len(split.sizes), source.head_dim
        base = torch.arange(source.num_heads)[:, None] * parts * head_dim
        return [(base + i * head_dim + torch.arange(head_dim)[None, :]).reshape(-1) for i in range(parts)]
    if split.kind == "grouped":
        return _grouped_rows(source)
    raise ValueError(f"unknown split kind {split.kind!r}")


def _grouped_rows(source: SourceModel) -> list[torch.Tensor]:
    """q, k, v rows of a layout that stores, per kv head, its query heads, its key and its value head."""
    head_dim, kv_heads = source.head_dim, source.num_kv_heads
    group = source.num_heads // kv_heads
    per_group = (group + 2) * head_dim
    starts = torch.arange(kv_heads)[:, None] * per_group
    q = (starts + torch.arange(group * head_dim)[None, :]).reshape(-1)
    k = (starts + group * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    return [q, k, k + head_dim]


def fuse_rows(parts: list[torch.Tensor], index: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of splitting: put each role's rows back at its place in the fused output."""
    total = sum(len(i) for i in index)
    fused = parts[0].new_empty((total, *parts[0].shape[1:]))
    for part, rows in zip(parts, index, strict=True):
        fused[rows] = part
    return fused
