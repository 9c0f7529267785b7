"""AdapterHub bottleneck weights lowered to `Bottleneck` ops, checked against the config and base."""

from __future__ import annotations

from pathlib import Path

from adaptrix.frontends.adapterhub.config import BnSettings
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Bottleneck, BottleneckBlock, LayerNormParams, LazyTensor, Op, Role, Site

__all__ = ["HUB_LOCATIONS", "lower_bottlenecks"]

# Where AdapterHub keeps each block's adapters inside a layer, per binder.
HUB_LOCATIONS = {
    "llama": {"attention_adapters": BottleneckBlock.ATTN, "output_adapters": BottleneckBlock.MLP},
    "bert": {"attention.output": BottleneckBlock.ATTN, "output": BottleneckBlock.MLP},
}
_SITE_ROLE = {BottleneckBlock.ATTN: Role.ATTN_O, BottleneckBlock.MLP: Role.MLP_DOWN}
_CONFIG_KEY = {BottleneckBlock.ATTN: "mh_adapter", BottleneckBlock.MLP: "output_adapter"}


def lower_bottlenecks(
    settings: BnSettings, found: dict[tuple[int, str], dict[str, LazyTensor]], base: Checkpoint, file: Path
) -> list[tuple[Site, Op]]:
    """One op per (layer, block) the config places an adapter at; every tensor used, none missing."""
    binder = base.binder
    locations = HUB_LOCATIONS.get(binder.name)
    if locations is None or not binder.bottleneck_points:
        raise UnsupportedError(
            f"has bottleneck adapters, which Adaptrix compiles for llama and bert bases, "
            f"not {base.source.arch}",
            path=file,
        )
    _check_residual_option(settings, binder.name, file)
    leave_out = {int(i) for i in settings["leave_out"] or []}
    expected = {
        (layer, loc)
        for layer in range(base.source.num_layers)
        if layer not in leave_out
        for loc, block in locations.items()
        if settings[_CONFIG_KEY[block]]
    }
    for where in sorted(found.keys() - expected):
        raise BadInputError(
            f"has bottleneck weights at layer {where[0]} {where[1]!r}, where the config places "
            "no adapter (mh_adapter / output_adapter / leave_out)",
            path=file,
            fix="fix adapter_config.json or re-save the adapter",
        )
    for where in sorted(expected - found.keys()):
        raise BadInputError(
            f"has no bottleneck weights for layer {where[0]} {where[1]!r}, where the config "
            "places an adapter",
            path=file,
            fix="the adapter file is incomplete; re-save it",
        )
    groups = _shared_groups(found, locations)
    ops = []
    for (layer, loc), params in sorted(found.items()):
        block = locations[loc]
        op = _op(settings, params, block, base.source.hidden_size, layer, file, groups.get((layer, loc)))
        ops.append((Site(layer, _SITE_ROLE[block]), op))
    return ops


def _check_residual_option(settings: BnSettings, binder: str, file: Path) -> None:
    """post_add needs the layer's own norm and original_ln_before: AdapterHub fails otherwise."""
    post_add = settings["residual_before_ln"] == "post_add" and not settings["is_parallel"]
    if post_add and (not settings["original_ln_before"] or binder != "bert"):
        raise UnsupportedError(
            "sets residual_before_ln='post_add' without original_ln_before on a model with a post-block "
            "LayerNorm; AdapterHub itself cannot run this combination",
            path=file,
            fix="set residual_before_ln to true or false",
        )


def _shared_groups(
    found: dict[tuple[int, str], dict[str, LazyTensor]], locations: dict
) -> dict[tuple[int, str], str]:
    """Name the ops whose tensors are the same objects as another op's (weights shared across layers)."""
    owners: dict[int, tuple[int, str]] = {}
    groups: dict[tuple[int, str], str] = {}
    for where, params in sorted(found.items()):
        for tensor in params.values():
            first = owners.setdefault(id(tensor), where)
            if first != where:
                name = f"layer {first[0]} {locations[first[1]]}"
                groups[first] = groups[where] = name
    return groups


def _op(
    settings: BnSettings,
    params: dict[str, LazyTensor],
    block: BottleneckBlock,
    hidden: int,
    layer: int,
    file: Path,
    shared: str | None,
) -> Bottleneck:
    params = dict(params)
    size = max(1, int(hidden // settings.reduction_factor(layer)))
    where = f"layer {layer} {block}"
    norm_before = None
    if settings["ln_before"]:  # one LayerNorm, saved under two names (adapter_norm_before, adapter_down.0)
        for param in ("weight", "bias"):
            alias = params.pop(f"adapter_norm_before.{param}", None)
            if alias is not None and params.get(f"adapter_down.0.{param}", alias).shape != alias.shape:
                raise BadInputError(f"has two different adapter_norm_before.{param} at {where}", path=file)
            params.setdefault(f"adapter_down.0.{param}", alias)
        norm_before = _norm(params, "adapter_down.0", hidden, where, file)
        linear = "adapter_down.1"
    else:
        linear = "adapter_down.0"
    down = _take(params, f"{linear}.weight", (size, hidden), where, file)
    down_bias = _take(params, f"{linear}.bias", (size,), where, file)
    up = _take(params, "adapter_up.weight", (hidden, size), where, file)
    up_bias = _take(params, "adapter_up.bias", (hidden,), where, file)
    norm_after = _norm(params, "adapter_norm_after", hidden, where, file) if settings["ln_after"] else None
    scaling = settings["scaling"]
    scale = 1.0
    if isinstance(scaling, int | float):
        scale = float(scaling)
    else:  # learned ([1]) or channel ([hidden]): up * scaling, folded into the up-projection's rows
        vector = _take(params, "scaling", (1,) if scaling == "learned" else (hidden,), where, file)
        up = up.map(lambda t, v=vector: t * v.load()[:, None], up.shape)
        up_bias = up_bias.map(lambda t, v=vector: t * v.load(), up_bias.shape)
    if params:
        raise BadInputError(
            f"holds {sorted(params)[0]!r} at {where}, which the config does not explain",
            path=file,
            fix="re-save the adapter",
        )
    return Bottleneck(
        down,
        down_bias,
        up,
        up_bias,
        str(settings["non_linearity"]),
        block,
        parallel=bool(settings["is_parallel"]),
        scale=scale,
        original_ln_before=bool(settings["original_ln_before"]),
        original_ln_after=bool(settings["original_ln_after"]),
        residual_before_ln=settings["residual_before_ln"],
        adapter_residual_before_ln=bool(settings["adapter_residual_before_ln"]),
        ln_before=norm_before,
        ln_after=norm_after,
        shared=shared,
    )


def _take(params: dict, key: str, shape: tuple[int, ...], where: str, file: Path) -> LazyTensor:
    tensor = params.pop(key, None)
    if tensor is None:
        raise BadInputError(
            f"has no {key} at {where}", path=file, fix="the adapter file is incomplete; re-save it"
        )
    if tensor.shape != shape:
        raise BadInputError(
            f"{key} at {where} has shape {list(tensor.shape)}, but the base and the config's "
            f"reduction_factor need {list(shape)}",
            path=file,
            fix="use the base the adapter was trained on, or fix reduction_factor",
        )
    return tensor


def _norm(params: dict, prefix: str, hidden: int, where: str, file: Path) -> LayerNormParams:
    weight = _take(params, f"{prefix}.weight", (hidden,), where, file)
    return LayerNormParams(weight, _take(params, f"{prefix}.bias", (hidden,), where, file))
