"""Routed: several adapters' LoRA pairs at one site, mixed per token by a router (PEFT's Arrow).

Per token x (the module's input): scores |x @ prototypes.T| (one per adapter), the top_k of them
kept, a softmax of those over `temperature`, and the output gains sum_e coeff_e * scale_e * B_e A_e x.
Every adapter stays low-rank. The prototypes ([adapters, in]) are computed when the op is made
(adaptrix.passes.route); the roles of one fused module share one prototype per adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.lazy import LazyTensor

__all__ = ["ROUTE_METHODS", "Routed", "refuse_routed", "route_summary"]

ROUTE_METHODS = ("arrow",)


@dataclass(frozen=True, slots=True, eq=False)
class Routed:
    """Adapters' LowRank ops at one site, one per adapter, with the router that mixes them per token."""

    adapters: tuple[str, ...]
    experts: tuple  # one adaptrix.ir.values.LowRank per adapter
    prototypes: LazyTensor  # [adapters, in], one unit vector per adapter
    top_k: int
    temperature: float
    method: str = "arrow"

    def __post_init__(self) -> None:
        """One expert and one prototype per adapter, all of one shape; options in range."""
        count = len(self.adapters)
        if len(self.experts) != count or count < 2:
            raise BadInputError(f"a routed op takes one LoRA pair per adapter, 2 or more; found "
                                f"{len(self.experts)} pairs for {count} adapters")  # fmt: skip
        shapes = {expert.shape for expert in self.experts}
        if len(shapes) != 1:
            raise BadInputError(f"the routed adapters' deltas have different shapes {sorted(shapes)}")
        if self.prototypes.shape != (count, self.shape[1]):
            raise BadInputError(f"{self.prototypes.origin} has shape {list(self.prototypes.shape)}, "
                                f"expected [{count}, {self.shape[1]}]")  # fmt: skip
        if self.method not in ROUTE_METHODS:
            raise ValueError(f"unknown routing method {self.method!r}")
        if not 1 <= self.top_k <= count:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the {count} adapters")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number above 0")

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of each adapter's delta, [out, in]."""
        return self.experts[0].shape

    @property
    def label(self) -> str:
        """What the op is, for messages."""
        return f"routed LoRA ({self.method}, {len(self.adapters)} adapters)"

    def options(self) -> dict[str, object]:
        """The router's options, for manifests."""
        return {"method": self.method, "top_k": self.top_k, "temperature": self.temperature}


def refuse_routed(ops, what: str, fix: str) -> None:
    """Raise UnsupportedError naming the first site of a Routed op among (site, op) pairs."""
    for site, op in ops:
        if isinstance(op, Routed):
            raise UnsupportedError(f"{what} ({site} routes between {len(op.adapters)} adapters)", fix=fix)


def route_summary(ops) -> dict | None:
    """The manifest's `route` record of a routed IR's (site, op) pairs: adapters and options; None if none."""
    for _, op in ops:
        if isinstance(op, Routed):
            return {"adapters": list(op.adapters), **op.options()}
    return None
