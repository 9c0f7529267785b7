"""Applying IR ops to one base tensor: merged in float32, rounded once to the output dtype.

The work goes in blocks of rows of about a million elements, so that each float32 block stays in
the processor's cache between the upcast, the low-rank update and the rounding: ten times faster
than whole-tensor passes on a 2-core machine, and bit for bit the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adaptrix.binders.table import Layout, Placement, split_rows
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.finite import all_finite
from adaptrix.ir.values import Bias, DoRA, Factored, LowRank, Op, Replace, Scale, SourceModel

__all__ = ["merge_tensor", "op_params", "required_params"]

_BLOCK_ELEMENTS = 1 << 20
# Ops apply in this order at a site: new values first, then weight deltas, then IA3's scales
# (of the weight and bias as they are by then), then bias deltas.
_ORDER = {Replace: 0, LowRank: 1, DoRA: 1, Factored: 1, Scale: 2, Bias: 3}

Kernel = Callable[[torch.Tensor, slice | torch.Tensor], torch.Tensor]


def op_params(op: Op) -> set[str]:
    """The parameter names (weight, bias, ...) an op changes."""
    if isinstance(op, Replace):
        return set(op.tensors)
    if isinstance(op, Scale) and op.axis == "out":
        return {"weight", "bias"}  # the whole output is scaled: the bias too, where there is one
    return {"bias"} if isinstance(op, Bias) else {"weight"}


def required_params(op: Op) -> set[str]:
    """The parameters an op needs the base to have (an output scale needs no bias)."""
    return {"weight"} if isinstance(op, Scale) else op_params(op)


def merge_tensor(
    value: torch.Tensor,
    param: str,
    placement: Placement,
    role_ops: Sequence[Sequence[Op]],
    source: SourceModel,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    name: str = "a base tensor",
) -> torch.Tensor:
    """The merged value of one stored tensor (`name`), given the ops at each of its module's roles.

    With `out` (the stored layout, `out_dtype`), the value is written there and `out` returned;
    `out` may be `value` itself: each block is read before it is written. A base value that is
    not floating point or not finite, or a merged one that is not finite, is refused.
    """
    if not value.dtype.is_floating_point:
        raise BadInputError(f"{name} is stored as {value.dtype}: an adapter cannot change integers",
                            fix="use the unquantized base")  # fmt: skip
    conv1d = placement.module.layout is Layout.CONV1D and param == "weight"
    stored = value.T if conv1d else value  # canonical [out, in] view
    target = torch.empty(value.shape, dtype=out_dtype) if out is None else out  # the stored layout
    merged = target.T if conv1d else target
    in_place = out is value
    direct = out_dtype == torch.float32 and not in_place and not conv1d  # no float32 block besides the output
    index = split_rows(placement.module.split, source) or [None]
    for rows, ops in zip(index, role_ops, strict=True):
        relevant = sorted((op for op in ops if param in op_params(op)), key=lambda o: _ORDER[type(o)])
        kernels = [_kernel(op, param) for op in relevant]
        # A per-column norm spans every row of the role: such a role is merged in one piece.
        in_one_piece = any(isinstance(op, DoRA) and op.per_column for op in relevant)
        for whole, local in _segments(rows, stored, in_one_piece):
            if not kernels:
                if not in_place:
                    merged[whole] = stored[whole]
                continue
            if direct and isinstance(whole, slice):  # merged in place in the float32 output rows
                part = merged[whole].copy_(stored[whole])
                for kernel in kernels:
                    if (result := kernel(part, local)) is not part:
                        part.copy_(result)
            else:
                part = stored[whole].to(torch.float32, copy=True)  # never alias the caller's tensor
                for kernel in kernels:
                    part = kernel(part, local)
                merged[whole] = part
            if not all_finite(merged[whole]):  # one pass over the output; its cause found only then
                raise _not_finite(name, part, out_dtype)
    return target


def _not_finite(name: str | None, part: torch.Tensor, out_dtype: torch.dtype) -> BadInputError:
    """Why a merged block holds NaN or Inf: the base already did, or the output dtype overflowed.

    The adapter's own factors are checked finite when they are loaded, so a float32 merge that is
    not finite comes from the base's values.
    """
    if not all_finite(part):
        return BadInputError(f"{name} of the base holds NaN or Inf values",
                             fix="the base is corrupt: restore it")  # fmt: skip
    return BadInputError(
        f"{name} merged with the adapter holds NaN or Inf values (in {out_dtype})",
        fix="the adapter's scale or weights are far too large: check lora_alpha and r",
    )


def _segments(rows: torch.Tensor | None, stored: torch.Tensor, in_one_piece: bool = False):
    """(rows of the tensor, rows of the role) pairs covering a role in cache-sized blocks."""
    count = stored.shape[0] if rows is None else len(rows)
    start = 0 if rows is None else int(rows[0])
    interleaved = rows is not None and not torch.equal(rows, torch.arange(start, start + count))
    if in_one_piece or interleaved:
        yield (slice(None) if rows is None else rows), slice(None)  # one piece, or one gather
        return
    width = max(1, stored[0].numel()) if stored.dim() > 1 else 1
    step = max(1, _BLOCK_ELEMENTS // width)
    for begin in range(0, count, step):
        end = min(count, begin + step)
        yield slice(start + begin, start + end), slice(begin, end)


def _kernel(op: Op, param: str) -> Kernel:
    """Load an op's tensors once; return a function that applies it to a block of rows."""
    if isinstance(op, Replace):
        new = op.tensors[param].load()
        return lambda part, local: new[local].clone()
    if isinstance(op, Bias):
        delta = op.delta.load()
        return lambda part, local: part.add_(delta[local])
    if isinstance(op, Factored):
        dense = op.delta()
        return lambda part, local: part.add_(dense[local])
    if isinstance(op, Scale):
        vector = op.vector.load()
        if op.axis == "in":
            return lambda part, local: part.mul_(vector[None, :])
        if param == "bias":
            return lambda part, local: part.mul_(vector[local])
        return lambda part, local: part.mul_(vector[local][:, None])
    low_rank = op.low_rank if isinstance(op, DoRA) else op
    a, b, scale = low_rank.a.load(), low_rank.b.load(), low_rank.scale
    if isinstance(op, LowRank):
        return lambda part, local: part.addmm_(b[local], a, alpha=scale)
    magnitude = op.magnitude.load()

    def dora(part: torch.Tensor, local: slice | torch.Tensor) -> torch.Tensor:
        combined = part.addmm_(b[local], a, alpha=scale)
        if op.per_column:
            return combined.mul_((magnitude / torch.linalg.vector_norm(combined, dim=0))[None, :])
        norm = torch.linalg.vector_norm(combined, dim=1)
        return combined.mul_((magnitude[local] / norm)[:, None])

    return dora
