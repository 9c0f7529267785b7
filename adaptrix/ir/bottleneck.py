"""The `Bottleneck` op: a small nonlinear MLP beside or after a transformer block (AdapterHub).

With h the block's output (attention after o_proj, or the FFN after down_proj), r the residual
input the block's output is added to, and LN the layer's own LayerNorm (BERT; None for Llama,
whose residual add has no norm), AdapterHub computes, for a sequential adapter:

    x   = LN(h + r) if original_ln_before (h + r without LN) else h
    res = h if residual_before_ln is True, h + r if "post_add", else x
    y   = scale * (up @ act(down @ ln_before(x) + down_bias) + up_bias)
    out = ln_after(y + res) if adapter_residual_before_ln else ln_after(y) + res
    out = LN(out + r) if original_ln_after (out + r without LN) else out

and for a parallel one (x = r, the block's input residual stream):

    out = ln_after(scale * up(act(down(ln_before(r))))) + h, then the same original_ln_after step.

The model without the adapter computes LN(h + r) (h + r without LN). ln_before / ln_after are
the adapter's own LayerNorms (absent unless configured). Layer norms use eps 1e-5 (nn.LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from adaptrix.artifacts import ACTIVATION_NAMES, IDENTITY
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.lazy import LazyTensor

__all__ = ["Bottleneck", "BottleneckBlock", "LayerNormParams", "refuse_bottlenecks"]


class BottleneckBlock(StrEnum):
    """The block a bottleneck follows (or runs beside): attention (mh_adapter) or the FFN."""

    ATTN = "attn"
    MLP = "mlp"


@dataclass(frozen=True, slots=True, eq=False)
class LayerNormParams:
    """An adapter's own LayerNorm: weight and bias [dim], eps."""

    weight: LazyTensor
    bias: LazyTensor
    eps: float = 1e-5


@dataclass(frozen=True, slots=True, eq=False)
class Bottleneck:
    """A bottleneck adapter at one block of one layer (see the module docstring for the math).

    down [size, in], up [out, size]; biases [size] / [out] or None. `shared`: a name for tensors
    this op shares with ops of other layers (the same LazyTensor objects), stored once by targets.
    `foldable`: False where the user asked to keep it an op (fuse-hybrid:fold=false), so that no
    target folds it into weights even when it is linear.
    """

    down: LazyTensor
    down_bias: LazyTensor | None
    up: LazyTensor
    up_bias: LazyTensor | None
    act: str
    block: BottleneckBlock
    parallel: bool = False
    scale: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: LayerNormParams | None = None
    ln_after: LayerNormParams | None = None
    shared: str | None = None
    foldable: bool = True

    def __post_init__(self) -> None:
        """Check the shapes, the activation and the residual option."""
        size = self.down.shape[0] if len(self.down.shape) == 2 else None
        if size is None or len(self.up.shape) != 2 or self.up.shape[1] != size:
            raise BadInputError(
                f"{self.up.origin} {list(self.up.shape)} and {self.down.origin} {list(self.down.shape)} "
                "do not form a bottleneck up[out, size] @ act(down[size, in])"
            )
        for bias, width in ((self.down_bias, size), (self.up_bias, self.up.shape[0])):
            if bias is not None and bias.shape != (width,):
                raise BadInputError(f"{bias.origin} has shape {list(bias.shape)}, expected [{width}]")
        if self.act.lower() not in ACTIVATION_NAMES:
            raise UnsupportedError(
                f"activation {self.act!r} is not supported",
                fix=f"supported: {', '.join(sorted(ACTIVATION_NAMES))}",
            )
        if self.residual_before_ln not in (True, False, "post_add"):
            raise BadInputError(
                f"residual_before_ln={self.residual_before_ln!r} is not true, false or 'post_add'"
            )

    @property
    def size(self) -> int:
        """The bottleneck width."""
        return self.down.shape[0]

    @property
    def label(self) -> str:
        """What the op is, for messages."""
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind} bottleneck ({self.act}, size {self.size}) at the {self.block} block"

    @property
    def is_linear(self) -> bool:
        """Identity activation and no adapter layer norm."""
        return self.act.lower() == IDENTITY and self.ln_before is None and self.ln_after is None

    def tensors(self) -> dict[str, LazyTensor]:
        """Every tensor of the op by its bundle name (absent ones left out)."""
        found = {"down": self.down, "down_bias": self.down_bias, "up": self.up, "up_bias": self.up_bias}
        for name, norm in (("ln_before", self.ln_before), ("ln_after", self.ln_after)):
            if norm is not None:
                found[f"{name}_weight"], found[f"{name}_bias"] = norm.weight, norm.bias
        return {key: value for key, value in found.items() if value is not None}

    @property
    def parameters(self) -> int:
        """Number of parameters (shared ones counted here too)."""
        return sum(t.numel for t in self.tensors().values())


def refuse_bottlenecks(ops, what: str, fix: str) -> None:
    """Raise UnsupportedError naming the sites of any Bottleneck among (site, op) pairs."""
    sites = [str(site) for site, op in ops if isinstance(op, Bottleneck)]
    if sites:
        shown = ", ".join(sites[:4]) + (f" and {len(sites) - 4} more" if len(sites) > 4 else "")
        raise UnsupportedError(f"{what} (bottleneck adapters at {shown})", fix=fix)
