"""The exact low-rank form of a LoHa or LoKr delta (a `Factored` op), for targets that take LoRA pairs.

LoHa: (w1a @ w1b) * (w2a @ w2b) = B @ A with B = w1a face-split w2a [out, r1 r2] (row i of B is
the Kronecker product of row i of w1a and of w2a) and A = w1b Khatri-Rao w2b [r1 r2, in] (column j
likewise from the columns j). The rank is r1 r2.

LoKr: kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2), with each factor w = U @ V taken as its
product (w_a, w_b) or whole beside an identity (w @ I, or I @ w), whichever inner size is the
smallest. The rank is the product of the two inner sizes. Where it is not below min(out, in) the
form is still exact, only not compact.

The scale stays the op's scale and fused roles take their rows of B, so that scale * B @ A is the
op's `delta()` in meaning (the sums run in another order: equal to float rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adaptrix.ir.values import AdapterIR, Factored, LazyTensor, LowRank, Op

__all__ = ["factored_as_low_rank", "form_rank", "low_rank_form", "low_rank_record", "with_low_rank_forms"]

logger = logging.getLogger(__name__)

Loader = Callable[[], torch.Tensor]


@dataclass(frozen=True, slots=True)
class _Split:
    """One LoKr factor w [rows, cols] as left [rows, inner] @ right [inner, cols]."""

    rows: int
    inner: int
    cols: int
    left: Loader
    right: Loader


def _identity(size: int) -> Loader:
    return lambda: torch.eye(size)


def _lokr_split(op: Factored, name: str) -> _Split:
    """The factor `name` (w1 or w2) split with the smallest inner size it allows."""
    if name in op.factors:
        whole = op.factors[name]
        rows, cols = whole.shape
        product: Loader = whole.load
        options = []
    else:
        a, b = op.factors[f"{name}a"], op.factors[f"{name}b"]
        rows, cols = a.shape[0], b.shape[1]

        def product() -> torch.Tensor:
            return a.load() @ b.load()

        options = [_Split(rows, a.shape[1], cols, a.load, b.load)]
    options += [
        _Split(rows, cols, cols, product, _identity(cols)),
        _Split(rows, rows, cols, _identity(rows), product),
    ]
    return min(options, key=lambda split: split.inner)  # the first of equal sizes: a stored product first


def form_rank(op: Factored) -> int:
    """The rank of the op's exact low-rank form (from shapes only: nothing is loaded)."""
    if op.kind == "lokr":
        return _lokr_split(op, "w1").inner * _lokr_split(op, "w2").inner
    return op.factors["w1a"].shape[1] * op.factors["w2a"].shape[1]


def _whole_pair(op: Factored) -> tuple[LazyTensor, LazyTensor]:
    """A [rank, in] and B [full out, rank] of the whole delta, before any row selection, unscaled."""
    out, inner = op.full_shape
    rank = form_rank(op)
    origin = f"{op.label} factors {' '.join(t.origin for _, t in sorted(op.factors.items()))}"
    if op.kind == "lokr":
        first, second = _lokr_split(op, "w1"), _lokr_split(op, "w2")

        def a_loader() -> torch.Tensor:
            return torch.kron(first.right(), second.right().contiguous())

        def b_loader() -> torch.Tensor:
            return torch.kron(first.left(), second.left().contiguous())
    else:
        w1a, w1b, w2a, w2b = (op.factors[name] for name in ("w1a", "w1b", "w2a", "w2b"))

        def a_loader() -> torch.Tensor:  # Khatri-Rao: column j is kron(w1b[:, j], w2b[:, j])
            return (w1b.load()[:, None, :] * w2b.load()[None, :, :]).reshape(rank, inner)

        def b_loader() -> torch.Tensor:  # face-splitting: row i is kron(w1a[i], w2a[i])
            return (w1a.load()[:, :, None] * w2a.load()[:, None, :]).reshape(out, rank)

    return LazyTensor((rank, inner), f"A of {origin}", a_loader), LazyTensor(
        (out, rank), f"B of {origin}", b_loader
    )


def low_rank_form(op: Factored) -> LowRank:
    """The op's exact low-rank equivalent: scale * B @ A equals its dense delta (its rows, if any)."""
    return with_low_rank_forms([op])[0]


def with_low_rank_forms(ops: Sequence[Op]) -> list[Op]:
    """The ops with every Factored op replaced by its low-rank form, other ops as they are.

    Ops made from the same factors (the roles of a fused module) share one A and take their rows
    of one B, so that writers keep them as one pair, as they do PEFT's LoRA on a fused module.
    """
    pairs: dict[tuple, tuple[LazyTensor, LazyTensor]] = {}  # the ops keep their factors alive
    found: list[Op] = []
    for op in ops:
        if not isinstance(op, Factored):
            found.append(op)
            continue
        key = (op.kind, *sorted((name, id(tensor)) for name, tensor in op.factors.items()))
        if key not in pairs:
            pairs[key] = _whole_pair(op)
        a, b = pairs[key]
        found.append(LowRank(a, b if op.rows is None else b.rows(op.rows), op.scale))
    return found


def factored_as_low_rank(ir: AdapterIR) -> AdapterIR:
    """The IR with its LoHa / LoKr ops as their exact low-rank forms (the IR itself when it has none)."""
    ops = [op for _, op in ir]
    if not any(isinstance(op, Factored) for op in ops):
        return ir
    logger.info("%s: LoHa / LoKr ops written as their exact low-rank forms", ir.name)
    pairs = zip((site for site, _ in ir), with_low_rank_forms(ops), strict=True)
    return AdapterIR(tuple(pairs), ir.source, ir.name)


def low_rank_record(ir: AdapterIR) -> list[dict[str, object]]:
    """Each LoHa / LoKr op of the IR: its site, its kind and the rank of its low-rank form."""
    return [
        {"layer": site.layer, "role": str(site.role), "from": op.kind, "rank": form_rank(op)}
        for site, op in ir
        if isinstance(op, Factored)
    ]
