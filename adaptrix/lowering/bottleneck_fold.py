"""A linear bottleneck folded exactly into the projection it follows: a LoRA pair and a bias delta.

A sequential bottleneck with the identity activation and no layer norm of its own, that reads
the block's output h (not original_ln_before, not parallel) and hands its result to the layer's
own residual and norm (original_ln_after), computes h' = h + s (U (D h + bd) + bu). With
h = W x + b from the projection (o_proj / down_proj, BERT's dense), where W and b already carry
the other LoRA and bias deltas at the same site (W = W0 + sum s_i B_i A_i, b = b0 + sum delta_i:
the bottleneck reads their output):

    W' = W + s U (D W)          a LowRank with A = D W [size, in], B = U [out, size], scale s
    b' = b + s (U (D b + bd) + bu)

D W is computed as D W0 + sum s_i (D B_i) A_i, never a dense delta. A module without a bias can
take the second line only when it is zero. Used by the merged target and the fuse-hybrid pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Bias, Bottleneck, LazyTensor, LowRank, Op, Site

__all__ = ["fold_bottleneck", "why_not_foldable"]

_READ = (LowRank, Bias)  # ops beside a bottleneck that fold with it


def why_not_foldable(op: Bottleneck, beside: Sequence[Op] = ()) -> str | None:
    """Why a bottleneck cannot become a weight delta, or None when it can.

    `beside` are the other ops at its site: LoRA and bias deltas fold with it (it reads their
    output); any other kind there keeps it from folding.
    """
    if op.act.lower() != "linear":
        return f"its activation {op.act} is nonlinear"
    if op.ln_before is not None or op.ln_after is not None:
        return "it has a layer norm of its own"
    if op.parallel:
        return "it is parallel: it reads the block's input residual stream, not the projection's output"
    if op.original_ln_before:
        return "it reads the residual stream after the block (original_ln_before)"
    if not op.original_ln_after:
        return "it replaces the layer's residual and norm (original_ln_after false)"
    others = sorted({getattr(o, "label", type(o).__name__) for o in beside if not isinstance(o, _READ)})
    if others:
        return f"its projection also has a {others[0]} op, whose output the bottleneck reads"
    if not op.foldable:
        return "it is kept as an op (fuse-hybrid:fold=false)"
    return None


def fold_bottleneck(site: Site, op: Bottleneck, base: Checkpoint, beside: Sequence[Op] = ()) -> list[Op]:
    """The LowRank (and Bias, where the projection has a bias) ops equal to a foldable bottleneck.

    `beside`: the LowRank and Bias ops at the same site, which the bottleneck reads the output
    of. A bias change on a projection without a bias is an UnsupportedError.
    """
    module = _projection(site, op, base)
    weight_name, bias_name = f"{module}.weight", f"{module}.bias"
    has_bias = bias_name in base.tensors
    out_rows, in_cols = base.tensors[weight_name].shape
    if op.down.shape[1] != out_rows or op.up.shape[0] != out_rows:
        raise BadInputError(
            f"{site}: the bottleneck {list(op.up.shape)} / {list(op.down.shape)} does not fit {module} "
            f"{[out_rows, in_cols]}",
            fix="use the base the adapter was made for",
        )
    down, up = op.down, op.up
    low_ranks = [o for o in beside if isinstance(o, LowRank)]
    biases = [o for o in beside if isinstance(o, Bias)]

    def a_loader() -> torch.Tensor:
        d = down.load()
        a = d @ base.read(weight_name).to(torch.float32)
        for lr in low_ranks:
            a = a + ((d @ lr.b.load()) * lr.scale) @ lr.a.load()
        return a

    def bias_loader() -> torch.Tensor:
        inner = torch.zeros(op.size) if op.down_bias is None else op.down_bias.load()
        read = base.read(bias_name).to(torch.float32) if has_bias else torch.zeros(out_rows)
        read = read + sum((b.delta.load() for b in biases), torch.zeros(out_rows))
        outer = up.load() @ (inner + down.load() @ read)
        if op.up_bias is not None:
            outer = outer + op.up_bias.load()
        return outer * op.scale

    reads = " and its other deltas" if beside else ""
    a = LazyTensor((op.size, in_cols), f"{down.origin} @ {weight_name}{reads}", a_loader)
    folded: list[Op] = [LowRank(a, up, op.scale)]
    bias = LazyTensor((out_rows,), f"bias of {down.origin} and {up.origin}", bias_loader)
    if has_bias or biases:
        folded.append(Bias(bias))
    elif bool(bias.load().abs().max() > 0):
        raise UnsupportedError(
            f"{site}: the identity bottleneck's biases change the output of {module}, which has no bias "
            "to fold them into",
            fix="use --target hooks (unmerged) or onnx-cpu / onnx-cuda (bottlenecks as graph nodes)",
        )
    return folded


def _projection(site: Site, op: Bottleneck, base: Checkpoint) -> str:
    """The checkpoint name of the module whose output the bottleneck reads (o_proj, down_proj, dense)."""
    points = base.binder.bottleneck_points.get(str(op.block))
    if points is None:
        raise UnsupportedError(f"{site}: bottleneck adapters on {base.source.arch} are not supported",
                               fix="use a llama or bert base")  # fmt: skip
    for name in base.tensors:
        module = name.rpartition(".")[0]
        placement = base.binder.resolve(module)
        found = placement is not None and placement.layer == site.layer and placement.key == points.projection
        if found and name.endswith(".weight"):
            return module
    raise BadInputError(f"{site}: the base has no {points.projection} in layer {site.layer}",
                        path=base.path, fix="use the base the adapter was made for")  # fmt: skip
