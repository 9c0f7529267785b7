"""The IR: per-layer, per-role weight deltas, independent of any file format or architecture.

Every value here is immutable. Tensors are referenced lazily (`LazyTensor`): a shape and a
loader, read and checked (shape, finite) only when a target or pass needs the numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import torch

from adaptrix.ir.bottleneck import Bottleneck, BottleneckBlock, LayerNormParams
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.kinds import Factored, Scale
from adaptrix.ir.lazy import LazyTensor
from adaptrix.ir.route import Routed

__all__ = [
    "GLOBAL_ROLES",
    "ROLE_VALUES",
    "AdapterIR",
    "Bias",
    "Bottleneck",
    "BottleneckBlock",
    "DoRA",
    "Factored",
    "LayerNormParams",
    "LazyTensor",
    "LowRank",
    "Op",
    "Replace",
    "Role",
    "Routed",
    "Scale",
    "Site",
    "SourceModel",
    "is_module_role",
    "refuse_module_roles",
    "site_order",
]


class Role(StrEnum):
    """The semantic role of a weight, whatever the architecture calls it."""

    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    ATTN_NORM = "attn_norm"
    MLP_NORM = "mlp_norm"
    XATTN_Q = "xattn_q"  # an encoder-decoder's cross-attention (T5 EncDecAttention, BART encoder_attn)
    XATTN_K = "xattn_k"
    XATTN_V = "xattn_v"
    XATTN_O = "xattn_o"
    XATTN_NORM = "xattn_norm"
    EMBED = "embed"
    EMBED_POS = "embed_pos"
    EMBED_TYPE = "embed_type"
    EMBED_NORM = "embed_norm"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    POOLER = "pooler"
    CLS_DENSE = "cls_dense"
    CLS_HEAD = "cls_head"


GLOBAL_ROLES = frozenset(
    {
        Role.EMBED,
        Role.EMBED_POS,
        Role.EMBED_TYPE,
        Role.EMBED_NORM,
        Role.FINAL_NORM,
        Role.LM_HEAD,
        Role.POOLER,
        Role.CLS_DENSE,
        Role.CLS_HEAD,
    }
)


@dataclass(frozen=True, slots=True, order=True)
class Site:
    """Where an op applies: a layer (None for model-level roles) and a role.

    A role is a semantic `Role`, or for a module no binder table names (an MoE expert, a
    family without a table) a module role: the module's name inside its layer, or inside
    the model for a model-level module, as a plain string.
    """

    layer: int | None
    role: Role | str

    def __post_init__(self) -> None:
        """Check that model-level roles have no layer and layer roles have one."""
        if not isinstance(self.role, Role):
            if not isinstance(self.role, str) or not self.role or self.role in ROLE_VALUES:
                raise ValueError(f"module role {self.role!r} is not a module name")
            return
        if (self.layer is None) != (self.role in GLOBAL_ROLES):
            raise ValueError(f"role {self.role} {'needs' if self.layer is None else 'takes no'} layer")

    def __str__(self) -> str:
        """`layer 3 attn_q`, or `embed` for a model-level role."""
        return str(self.role) if self.layer is None else f"layer {self.layer} {self.role}"


@dataclass(frozen=True, slots=True)
class SourceModel:
    """The architecture and dimensions an adapter was made for."""

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    # An encoder-decoder's layers are numbered across its stacks: encoder layers 0 .. decoder_start - 1,
    # then the decoder's. None: one layer stack.
    decoder_start: int | None = None

    def as_dict(self) -> dict[str, object]:
        """The fields as a plain dict (for manifests and reports); decoder_start only where it is set."""
        return {name: getattr(self, name) for name in self.__slots__
                if name != "decoder_start" or self.decoder_start is not None}  # fmt: skip

    @property
    def q_size(self) -> int:
        """Output width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output width of the key and value projections."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class LowRank:
    """delta = scale * B @ A, with A [rank, in] and B [out, rank] (canonical [out, in] layout)."""

    a: LazyTensor
    b: LazyTensor
    scale: float

    def __post_init__(self) -> None:
        """Check that A and B share the rank."""
        if len(self.a.shape) != 2 or len(self.b.shape) != 2 or self.a.shape[0] != self.b.shape[1]:
            raise BadInputError(
                f"{self.b.origin} {list(self.b.shape)} and {self.a.origin} {list(self.a.shape)} "
                "do not form a low-rank pair B[out, r] @ A[r, in]"
            )

    @property
    def rank(self) -> int:
        """The rank r."""
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the delta, [out, in]."""
        return (self.b.shape[0], self.a.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense delta in float32."""
        return (self.b.load() @ self.a.load()) * self.scale


@dataclass(frozen=True, slots=True)
class Bias:
    """An additive change to a module's bias (or a norm's bias)."""

    delta: LazyTensor


@dataclass(frozen=True, slots=True)
class DoRA:
    """Weight-decomposed LoRA: W' = magnitude * (W + delta) / norm(W + delta).

    The norm is per row of the [out, in] weight (linear layers); `per_column` makes it per
    column, as PEFT does for embeddings ([num, dim]: one magnitude per hidden dimension).
    """

    low_rank: LowRank
    magnitude: LazyTensor
    per_column: bool = False

    def __post_init__(self) -> None:
        """Check one magnitude per row (or per column)."""
        size = self.low_rank.shape[1 if self.per_column else 0]
        if self.magnitude.shape != (size,):
            unit = "column" if self.per_column else "output row"
            raise BadInputError(
                f"{self.magnitude.origin} has shape {list(self.magnitude.shape)}, "
                f"expected [{size}] (one magnitude per {unit})"
            )


@dataclass(frozen=True, slots=True)
class Replace:
    """New values for a module's parameters (PEFT modules_to_save, saved base layers)."""

    tensors: Mapping[str, LazyTensor]

    def __post_init__(self) -> None:
        """Freeze the mapping."""
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))


Op = LowRank | Bias | DoRA | Replace | Factored | Scale | Bottleneck | Routed


@dataclass(frozen=True, slots=True)
class AdapterIR:
    """An adapter as ops at sites, with the model it was made for."""

    ops: tuple[tuple[Site, Op], ...]
    source: SourceModel
    name: str = "adapter"

    def __post_init__(self) -> None:
        """Check that a DoRA op is the only weight op at its site."""
        weight_ops: dict[Site, list[Op]] = {}
        for site, op in self.ops:
            if isinstance(op, LowRank | DoRA | Factored):
                weight_ops.setdefault(site, []).append(op)
        for site, found in weight_ops.items():
            if len(found) > 1 and any(isinstance(op, DoRA) for op in found):
                raise BadInputError(f"{self.name}: {site} has a DoRA op beside other weight ops")

    def sites(self) -> list[Site]:
        """Every site with an op, in order, each once."""
        return sorted({site for site, _ in self.ops}, key=site_order)

    def by_site(self) -> dict[Site, list[Op]]:
        """All ops grouped by site."""
        grouped: dict[Site, list[Op]] = {}
        for site, op in self.ops:
            grouped.setdefault(site, []).append(op)
        return grouped

    def __iter__(self) -> Iterator[tuple[Site, Op]]:
        """Iterate over (site, op) pairs."""
        return iter(self.ops)


_ROLE_ORDER = {role: i for i, role in enumerate(Role)}
ROLE_VALUES = frozenset(role.value for role in Role)  # no module role may take one of these names


def site_order(site: Site) -> tuple[int, int, str]:
    """Sort key for sites: model-level roles first, then by layer, roles in declaration order.

    Module roles come after the semantic ones of their layer, by name.
    """
    layer = -1 if site.layer is None else site.layer
    if isinstance(site.role, Role):
        return (layer, _ROLE_ORDER[site.role], "")
    return (layer, len(_ROLE_ORDER), site.role)


def refuse_module_roles(ir: AdapterIR, what: str) -> None:
    """Refuse an IR with a module role (a site no binder table named), for work that needs roles."""
    for site, _ in ir:
        if is_module_role(site.role):
            raise UnsupportedError(
                f"{what}, and {site} of the {ir.source.arch} base has none",
                fix=f"add a role table for {ir.source.arch} in adaptrix/binders/ (see docs/support.md), "
                "or compile without it",
            )


def is_module_role(role: Role | str) -> bool:
    """Whether a role is a module's name (no binder table gave it a semantic role)."""
    return not isinstance(role, Role)
