"""adapter_config.json fields of PEFT's LoHa, LoKr, IA3 and VeRA, as tables (PEFT 0.21).

For each peft_type: the fields that change what the adapter computes and that Adaptrix honours,
the ones that only matter while training or are described by the saved tensors' shapes, and the
name of its alpha field. Any other field set to a value is an error (config.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "KindFields"]

_TARGETING = frozenset(
    {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"}
)
_COMMON_HARMLESS = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "peft_version",
        "peft_type",
    }
)


@dataclass(frozen=True, slots=True)
class KindFields:
    """The adapter_config.json fields of one peft_type."""

    supported: frozenset[str]
    harmless: frozenset[str]
    alpha_field: str | None  # None: the kind has no alpha (IA3, VeRA: scale 1)
    has_rank: bool = True


KINDS = {
    # rank_dropout and module_dropout act only in training (PEFT's forward checks self.training);
    # use_effective_conv2d only on convolutions (the binders have none); init_weights at creation.
    "LOHA": KindFields(
        supported=_TARGETING | {"r", "alpha", "rank_pattern", "alpha_pattern"},
        harmless=_COMMON_HARMLESS
        | {"rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"},
        alpha_field="alpha",
    ),
    # decompose_both and decompose_factor decide the factors' shapes, which the saved tensors show
    # (the lowering checks that kron(w1, w2) has the module's shape); rank_dropout_scale is training.
    "LOKR": KindFields(
        supported=_TARGETING | {"r", "alpha", "rank_pattern", "alpha_pattern"},
        harmless=_COMMON_HARMLESS
        | {
            "rank_dropout",
            "module_dropout",
            "use_effective_conv2d",
            "init_weights",
            "decompose_both",
            "decompose_factor",
            "rank_dropout_scale",
        },
        alpha_field="alpha",
    ),
    # fan_in_fan_out describes GPT-2's Conv1D layout, which PEFT sets itself; the binder knows it.
    "IA3": KindFields(
        supported=(_TARGETING - {"layers_to_transform", "layers_pattern"}) | {"feedforward_modules"},
        harmless=_COMMON_HARMLESS | {"fan_in_fan_out", "init_ia3_weights"},
        alpha_field=None,
        has_rank=False,
    ),
    # d_initial and init_weights only initialise the vectors; vera_dropout is training only.
    "VERA": KindFields(
        supported=(_TARGETING - {"exclude_modules"})
        | {"r", "projection_prng_key", "save_projection", "bias"},
        harmless=_COMMON_HARMLESS | {"vera_dropout", "d_initial", "init_weights", "fan_in_fan_out"},
        alpha_field=None,
    ),
}
