"""A routed bundle entry (`--pass route`): several adapters' LoRA pairs mixed per token, as PEFT's Arrow.

The entry's `route` section: `method` ("arrow"), `top_k`, `temperature`, `adapters` (names),
`prototypes` (a tensor key, [adapters, in]) and `experts` (one {rank, down [in, r], up [r, out]}
per adapter, each adapter's scale folded into its `up`). Per token x the module's output gains
sum_e coeff_e * x @ down_e @ up_e, with coeff the softmax over the top_k of |x @ prototypes.T|
divided by the temperature (zero for the others), times the handle's scale. The hooks that
compute it: route_hook.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptrix.runtimes.hooks.bundle_schema import _finite, _object, _refuse, positive_int, string

__all__ = [
    "arrow_coefficients",
    "arrow_coefficients_of",
    "check_route",
    "route_shapes",
    "route_tensors",
]

_ROUTE_KEYS = {"method", "top_k", "temperature", "adapters", "prototypes", "experts"}
_EXPERT_KEYS = {"rank", "down", "up"}


def check_route(raw: object, file: Path, where: str) -> dict:
    """A `route` section's fields, each checked (the tensors' shapes: route_shapes)."""
    route = _object(raw, file, where, _ROUTE_KEYS)
    if route.get("method") != "arrow":
        _refuse(file, f"{where}.method", f"expected 'arrow', found {route.get('method')!r:.40}")
    adapters = route.get("adapters")
    if (
        not isinstance(adapters, list)
        or len(adapters) < 2
        or not all(isinstance(a, str) and a for a in adapters)
    ):
        _refuse(file, f"{where}.adapters", "expected a list of two adapter names or more")
    top_k = positive_int(route.get("top_k"), file, f"{where}.top_k")
    if top_k > len(adapters):
        _refuse(file, f"{where}.top_k", f"{top_k} is more than the {len(adapters)} adapters")
    if _finite(route.get("temperature"), file, f"{where}.temperature") <= 0:
        _refuse(file, f"{where}.temperature", "expected a number above 0")
    string(route.get("prototypes"), file, f"{where}.prototypes")
    experts = route.get("experts")
    if not isinstance(experts, list) or len(experts) != len(adapters):
        _refuse(file, f"{where}.experts", f"expected one expert per adapter ({len(adapters)})")
    for number, expert in enumerate(experts):
        expert = _object(expert, file, f"{where}.experts.{number}", _EXPERT_KEYS)
        positive_int(expert.get("rank"), file, f"{where}.experts.{number}.rank")
        string(expert.get("down"), file, f"{where}.experts.{number}.down")
        string(expert.get("up"), file, f"{where}.experts.{number}.up")
    return route


def route_shapes(route: dict, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """The shape each tensor of a route section must have."""
    shapes = {route["prototypes"]: (len(route["adapters"]), in_features)}
    for expert in route["experts"]:
        shapes[expert["down"]] = (in_features, expert["rank"])
        shapes[expert["up"]] = (expert["rank"], out_features)
    return shapes


def route_tensors(route: dict | None) -> set[str]:
    """Every tensor key a route section names."""
    if route is None:
        return set()
    return {route["prototypes"]} | {expert[key] for expert in route["experts"] for key in ("down", "up")}


def arrow_coefficients(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> torch.Tensor:
    """PEFT's Arrow coefficients [tokens, adapters]: softmax of the top_k |x @ P.T| / T, zeros elsewhere."""
    return arrow_coefficients_of(x @ prototypes.T, top_k, temperature)


def arrow_coefficients_of(scores: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Arrow's coefficients from the signed scores x @ P.T: softmax over the top_k of their |.|."""
    scores = scores.abs()
    top, index = torch.topk(scores, top_k, dim=-1)
    full = torch.full_like(scores, float("-inf")).scatter(-1, index, top)
    return torch.softmax(full / temperature, dim=-1)
