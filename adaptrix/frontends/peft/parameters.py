"""PEFT's target_parameters: LoRA on a 3-D expert parameter (ParamWrapper), lowered per stored expert.

transformers 5 loads MoE experts packed ([E, d0, d1], Mixtral's `mlp.experts.gate_up_proj`).
PEFT 0.22 wraps such a parameter with `lora_A` [r*E, d1] and `lora_B` [d0, r*E]; expert e's delta
is scale * B_e @ A_e with A_e = A.reshape(E, r, d1)[e] and B_e = B.reshape(d0, r, E)[:, :, e]
(`ParamWrapper.get_delta_weight`). Several parameters of one module nest their wrappers: the
first targeted parameter (in the module's registration order) is the innermost, so a record
under k `base_layer`s is the k-th targeted parameter counted from the last. Each expert's delta
is split into the rows of the stored weights it packs (w1 and w3 for gate_up_proj): one
`LowRank` per stored expert weight, at that weight's site, as a transformers 4 adapter has it.
A 2-D parameter (a router's weight) is a Linear's LoRA and is lowered as one.
"""

from __future__ import annotations

from adaptrix.binders.table import Binder
from adaptrix.frontends.peft.settings import LoraSettings
from adaptrix.frontends.peft.weights import PeftModule
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import LazyTensor, LowRank, Op, Site

__all__ = ["packed_ops", "targeted_param"]

_WRAPPED = ".base_layer"


def _unwrapped(name: str) -> tuple[str, int]:
    """The module's name without PEFT's nested `base_layer`s, and how many there were."""
    depth = 0
    while name.endswith(_WRAPPED):
        name, depth = name[: -len(_WRAPPED)], depth + 1
    return name, depth


def _loaded(binder: Binder, name: str) -> tuple[int, str] | None:
    """(layer, key) of a loaded module with packed parameters, or None."""
    found = binder.layer_of(name)
    return found if found is not None and found[1] in binder.packed_params else None


def targeted_param(binder: Binder, settings: LoraSettings, name: str) -> tuple[str, tuple[int, ...]] | None:
    """The parameter (name, loaded shape) a record on a packed module adapts, or None for another record."""
    module, depth = _unwrapped(name)
    found = _loaded(binder, module)
    if found is None:
        return None
    params = [(p, shape) for p, shape in binder.packed_params[found[1]]
              if settings.targets_parameter(f"{module}.{p}")]  # fmt: skip
    if depth >= len(params):
        raise BadInputError(
            f"has LoRA weights for {name!r}, but target_parameters wraps {len(params)} parameter(s) "
            f"of {module!r}", path=settings.path, fix="re-save the adapter with PEFT",
        )  # fmt: skip
    return params[len(params) - 1 - depth]


def packed_ops(binder: Binder, settings: LoraSettings, record: PeftModule) -> list[tuple[Site, Op]] | None:
    """The per-expert ops of a LoRA on a 3-D packed parameter; None where the record is no such LoRA."""
    target = targeted_param(binder, settings, record.name)
    if target is None or len(target[1]) != 3:
        return None
    param, (experts, rows, cols) = target
    module, _ = _unwrapped(record.name)
    layer, key = _loaded(binder, module)
    a, b = record.lora_a, record.lora_b
    extra = record.lora_b_bias is not None or record.magnitude is not None or record.factors or record.params
    if a is None or b is None or extra:
        raise UnsupportedError(f"has weights for {record.name!r} other than one lora_A and lora_B",
                               path=settings.path, fix="PEFT's ParamWrapper holds only those")  # fmt: skip
    full = f"{module}.{param}"
    rank = settings.rank(full)
    if a.shape != (rank * experts, cols) or b.shape != (rows, rank * experts):
        raise BadInputError(
            f"has lora_A {list(a.shape)} and lora_B {list(b.shape)} for {full!r} "
            f"[{experts}, {rows}, {cols}]; "
            f"r={rank} needs {[rank * experts, cols]} and {[rows, rank * experts]}",
            path=settings.path, fix="use the base the adapter was trained on",
        )  # fmt: skip
    scale = settings.scale(full)
    ops: list[tuple[Site, Op]] = []
    for piece in binder.layer_modules.values():
        packed = piece.packed
        if packed is None or (packed.module, packed.param) != (key, param):
            continue
        ops.append((Site(layer, piece.roles[0]), LowRank(_a(a, packed.expert, experts, rank, cols),
                                                     _b(b, packed.expert, packed.rows, experts, rank),
                                                     scale)))  # fmt: skip
    return ops


def _a(a: LazyTensor, expert: int, experts: int, rank: int, cols: int) -> LazyTensor:
    return a.map(lambda t: t.reshape(experts, rank, cols)[expert].contiguous(), (rank, cols))


def _b(b: LazyTensor, expert: int, rows: tuple[int, int], experts: int, rank: int) -> LazyTensor:
    first, last = rows
    shape = (last - first, rank)
    return b.map(lambda t: t.reshape(t.shape[0], rank, experts)[first:last, :, expert].contiguous(), shape)
