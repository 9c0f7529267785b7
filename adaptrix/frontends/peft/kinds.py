"""PEFT's LoHa, LoKr, IA3 and VeRA modules lowered to IR ops, as PEFT 0.21 computes them.

LoHa and LoKr become `Factored` ops (their dense delta computed from the factors when used), IA3
a `Scale` (output rows, or the input of PEFT's feedforward_modules), VeRA a `LowRank`:
(lambda_b * B[:out]) @ (lambda_d * A[:, :in]) with the shared projections A [r, in_max] and
B [out_max, r] from the adapter file, or regenerated from projection_prng_key as PEFT does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from adaptrix.binders.table import Layout, Placement
from adaptrix.frontends.peft.weights import PeftAdapter, PeftModule
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import Factored, LazyTensor, LowRank, Op, Scale

__all__ = ["kind_op", "vera_projections"]

_PREFIXES = {"LOHA": "hada_", "LOKR": "lokr_", "IA3": "ia3_l", "VERA": "vera_lambda_"}
_FACTORS = {
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b",
    "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b",
}  # fmt: skip
_TUCKER = ("hada_t1", "hada_t2", "lokr_t2")
# The layouts PEFT supports for each kind (LoHa / LoKr: nn.Linear only, not GPT-2's Conv1D).
_LAYOUTS = {
    "LOHA": (Layout.LINEAR,),
    "LOKR": (Layout.LINEAR,),
    "IA3": (Layout.LINEAR, Layout.CONV1D),
    "VERA": (Layout.LINEAR, Layout.CONV1D),
}

Projections = Callable[[], dict[str, LazyTensor]]


def kind_op(
    adapter: PeftAdapter, record: PeftModule, placement: Placement, shape: tuple[int, int],
    projections: Projections,
) -> Op:  # fmt: skip
    """The op of one module of a LoHa, LoKr, IA3 or VeRA adapter; `shape` is its weight's [out, in]."""
    kind, name, file = adapter.settings.peft_type, record.name, adapter.weights_file
    prefix = _PREFIXES.get(kind)
    wrong = [f for f in record.factors if prefix is None or not f.startswith(prefix)]
    if wrong or record.has_lora:
        found = wrong[0] if wrong else "lora_A / lora_B"
        raise BadInputError(
            f"holds {found} for {name!r}, which a peft_type {kind} adapter does not have",
            path=file,
            fix="fix peft_type in adapter_config.json or re-save the adapter",
        )
    layout = placement.module.layout
    if layout not in _LAYOUTS[kind]:
        raise UnsupportedError(
            f"has {kind} weights for {name!r}, a {layout} module; PEFT's {kind} works on "
            f"{' and '.join(str(x) for x in _LAYOUTS[kind])} modules only",
            path=file,
            fix="the adapter was not made by PEFT for this base; use the base it was trained on",
        )
    if kind == "IA3":
        return _ia3(adapter, record, shape)
    if kind == "VERA":
        return _vera(adapter, record, shape, projections())
    return _factored(adapter, record, shape)


def _checked(adapter: PeftAdapter, tensor: LazyTensor, expected: tuple[int, ...], why: str) -> LazyTensor:
    if tensor.shape != expected:
        raise BadInputError(
            f"tensor {tensor.origin.rpartition(':')[2]!r} has shape {list(tensor.shape)}, but {why} "
            f"needs {list(expected)}",
            path=adapter.weights_file,
            fix="use the base the adapter was trained on, or fix adapter_config.json",
        )
    return tensor


def _factored(adapter: PeftAdapter, record: PeftModule, shape: tuple[int, int]) -> Factored:
    settings, name = adapter.settings, record.name
    if cores := [t for t in _TUCKER if t in record.factors]:
        raise UnsupportedError(
            f"has {cores[0]} for {name!r}: Tucker cores belong to convolutions (use_effective_conv2d), "
            "which Adaptrix does not compile",
            path=adapter.weights_file,
            fix="use PEFT directly for convolution adapters",
        )
    kind = settings.peft_type.lower()
    try:
        op = Factored(kind, {_FACTORS[k]: v for k, v in record.factors.items()}, settings.scale(name))
        full = op.full_shape
    except BadInputError as exc:
        raise BadInputError(
            f"{name!r}: {exc.message}",
            path=adapter.weights_file,
            fix="the adapter file is corrupt; re-save it",
        ) from None
    if full != shape:
        raise BadInputError(
            f"{op.label} factors of {name!r} make a delta of shape {list(full)}, but the base's weight is "
            f"{list(shape)}",
            path=adapter.weights_file,
            fix="use the base the adapter was trained on",
        )
    rank = settings.rank(name)
    for factor, tensor in op.factors.items():
        if len(factor) == 3:  # one side of a product: its inner dimension is the rank
            inner = tensor.shape[1] if factor.endswith("a") else tensor.shape[0]
            if inner != rank:
                raise BadInputError(
                    f"{op.label} factor {factor} of {name!r} has rank {inner}, but adapter_config.json "
                    f"gives r={rank}",
                    path=adapter.weights_file,
                    fix="fix r / rank_pattern, or re-save the adapter",
                )
    return op


def _ia3(adapter: PeftAdapter, record: PeftModule, shape: tuple[int, int]) -> Scale:
    out_rows, in_cols = shape
    feedforward = adapter.settings.feedforward(record.name)
    expected = (1, in_cols) if feedforward else (out_rows, 1)
    role = "a feedforward module (feedforward_modules)" if feedforward else "a non-feedforward module"
    vector = _checked(adapter, record.factors["ia3_l"], expected, f"IA3 on {role}")
    size = expected[1] if feedforward else expected[0]
    return Scale(vector.map(lambda t: t.reshape(-1), (size,)), "in" if feedforward else "out")


def _vera(adapter: PeftAdapter, record: PeftModule, shape: tuple[int, int], shared: dict) -> LowRank:
    out_rows, in_cols = shape
    rank = adapter.settings.r
    missing = [f"vera_lambda_{side}" for side in "bd" if f"vera_lambda_{side}" not in record.factors]
    if missing:
        raise BadInputError(f"has no {missing[0]} for {record.name!r}", path=adapter.weights_file,
                            fix="the adapter file is incomplete; re-save it")  # fmt: skip
    lambda_b = _checked(adapter, record.factors["vera_lambda_b"], (out_rows,), "the module's output")
    lambda_d = _checked(adapter, record.factors["vera_lambda_d"], (rank,), f"r={rank}")
    a_all, b_all = shared["A"], shared["B"]

    def a_loader() -> torch.Tensor:
        return lambda_d.load()[:, None] * a_all.load()[:, :in_cols]

    def b_loader() -> torch.Tensor:
        return lambda_b.load()[:, None] * b_all.load()[:out_rows]

    a = LazyTensor((rank, in_cols), f"{a_all.origin}[:, :{in_cols}] * {lambda_d.origin}", a_loader)
    b = LazyTensor((out_rows, rank), f"{b_all.origin}[:{out_rows}] * {lambda_b.origin}", b_loader)
    return LowRank(a, b, 1.0)


def vera_projections(adapter: PeftAdapter, shapes: Iterable[tuple[int, int]]) -> dict[str, LazyTensor]:
    """VeRA's shared A [r, in_max] and B [out_max, r]: from the file, or regenerated as PEFT does.

    `shapes` are the [out, in] weight shapes of every module the adapter targets. PEFT draws A,
    then B, from a CPU torch.Generator seeded with projection_prng_key, each uniform in +-bound
    with bound = sqrt(6 / fan_in) (its `_kaiming_init`).
    """
    settings, file = adapter.settings, adapter.weights_file
    shapes = list(shapes)
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    rank = settings.r
    if rank > max(out_max, in_max):  # checked before anything of size r is read or drawn
        raise BadInputError(
            f"gives VeRA r={rank}, more than the largest dimension ({max(out_max, in_max)}) of the base "
            "modules it targets",
            path=settings.path,
            fix="fix r in adapter_config.json: VeRA's shared projections are [r, in] and [out, r]",
        )
    if adapter.shared:
        if set(adapter.shared) != {"A", "B"}:
            raise BadInputError("has only one of base_model.vera_A and vera_B", path=file,
                                fix="the adapter file is incomplete; re-save it")  # fmt: skip
        a, b = adapter.shared["A"], adapter.shared["B"]
        if len(a.shape) != 2 or a.shape[0] != rank or a.shape[1] < in_max:
            _checked(adapter, a, (rank, in_max), "VeRA's shared A for the targeted modules")
        if len(b.shape) != 2 or b.shape[1] != rank or b.shape[0] < out_max:
            _checked(adapter, b, (out_max, rank), "VeRA's shared B for the targeted modules")
        return {"A": a, "B": b}
    if settings.save_projection:
        raise BadInputError(
            "has no base_model.vera_A / vera_B, but adapter_config.json says save_projection=true",
            path=file,
            fix="re-save the adapter, or set save_projection to false if it was saved without them",
        )
    generated: dict[str, torch.Tensor] = {}

    def draw() -> dict[str, torch.Tensor]:
        if not generated:
            generator = torch.Generator(device="cpu").manual_seed(settings.projection_prng_key)
            for key, size in (("A", (rank, in_max)), ("B", (out_max, rank))):
                std = math.sqrt(2) / math.sqrt(size[1])  # PEFT's exact arithmetic, for the same bound
                bound = math.sqrt(3.0) * std
                generated[key] = torch.empty(size).uniform_(-bound, bound, generator=generator)
        return generated

    origin = f"VeRA projection from projection_prng_key={settings.projection_prng_key}"
    return {
        "A": LazyTensor((rank, in_max), f"{origin} A", lambda: draw()["A"]),
        "B": LazyTensor((out_max, rank), f"{origin} B", lambda: draw()["B"]),
    }
