"""A classifier adapter on a headless base: the task model's layout, its head taken from the adapter.

PEFT loads such a pair as `PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(base, num_labels=N), adapter)`: the body comes from the base, the head (saved
by `modules_to_save`) from the adapter. The merged target writes that model; the others, which
patch or hook the base as it is, refuse it with one line naming the merged target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from adaptrix.binders.table import Placement
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LazyTensor, Replace, Role, Site

__all__ = [
    "HEAD_ROLES",
    "HeadLayout",
    "head_layout",
    "new_head_sites",
    "refuse_new_head",
    "replaced_value",
    "task_labels",
]

logger = logging.getLogger(__name__)

HEAD_ROLES = frozenset({Role.CLS_HEAD, Role.CLS_DENSE})


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """The sequence-classification model a headless base and a saved head make.

    `names`: base tensor -> its name in the task model (the others are dropped); `head`: the
    task model's tensors that come from the adapter, with their module's placement.
    """

    architecture: str
    names: dict[str, str]
    head: dict[str, Placement]
    dropped: list[str]
    config: dict = field(default_factory=dict)  # what the output's config.json changes

    def manifest(self) -> dict:
        """The manifest's `head` section."""
        return {"architecture": self.architecture, "from_adapter": sorted(self.head), "dropped": self.dropped}


def new_head_sites(ir: AdapterIR, base: Checkpoint) -> list[Site]:
    """Head sites where the adapter replaces a module that the base does not have."""
    present = set()
    for name in base.tensors:
        placement = base.binder.resolve(name.rpartition(".")[0])
        if placement is not None:
            present.update(Site(placement.layer, role) for role in placement.module.roles)
    return [
        site for site, op in ir if site.role in HEAD_ROLES and isinstance(op, Replace) and site not in present
    ]


def refuse_new_head(ir: AdapterIR, base: Checkpoint, missing: list[Site]) -> None:
    """For targets that keep the base's layout: refuse a head the base lacks, naming the way."""
    heads = [site for site in missing if site in set(new_head_sites(ir, base))]
    if not heads:
        return
    names = sorted(_saved_names(ir, heads))
    raise UnsupportedError(
        f"the adapter brings a classification head ({', '.join(names)}) that the base has not: "
        "this target keeps the base's layout",
        path=base.path,
        fix="compile it with --target merged, which writes the classifier with the adapter's head",
    )


def _saved_names(ir: AdapterIR, sites: list[Site]) -> set[str]:
    """The adapter's tensor names for the ops at some sites (`classifier.weight`, ...)."""
    return {
        tensor.origin.rpartition(":")[2].removeprefix("base_model.model.")
        for site, op in ir
        if site in sites and isinstance(op, Replace)
        for tensor in op.tensors.values()
    }


def head_layout(ir: AdapterIR, base: Checkpoint, sites: list[Site]) -> HeadLayout:
    """The task model for a base without the head the adapter saved; refuse what it cannot load."""
    labels = task_labels(ir, sites, base)
    config = _task_config(base, labels)
    model = _meta_model(config, base)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    names, dropped = {}, []
    for name, info in base.tensors.items():
        out = prefix + name.removeprefix(prefix)
        if out not in expected:
            dropped.append(name)
            continue
        _check_shape(out, info.shape, expected[out], base.path, "the base")
        names[name] = out
    head = {}
    for name in expected.keys() - set(names.values()):
        head[name] = _head_placement(name, ir, sites, base, type(model).__name__)
        value = replaced_value(ir, head[name], name.rpartition(".")[2])
        _check_shape(name, value.shape, expected[name], base.path, "the adapter")
    if dropped:
        logger.warning("%s has no %s: left out of the merged model", type(model).__name__, ", ".join(dropped))
    updates = {
        "architectures": [type(model).__name__],
        "id2label": {str(i): label for i, label in model.config.id2label.items()},
        "label2id": dict(model.config.label2id),
    }
    return HeadLayout(type(model).__name__, names, dict(sorted(head.items())), dropped, updates)


def replaced_value(ir: AdapterIR, placement: Placement, param: str) -> LazyTensor | None:
    """The adapter's value for a parameter of a module it replaces, or None."""
    sites = {Site(placement.layer, role) for role in placement.module.roles}
    for site, op in ir:
        if site in sites and isinstance(op, Replace) and param in op.tensors:
            return op.tensors[param]
    return None


def task_labels(ir: AdapterIR, sites: list[Site], base: Checkpoint) -> int:
    """The number of labels: the rows of the adapter's output head."""
    for site, op in ir:
        if (
            site in sites
            and site.role is Role.CLS_HEAD
            and isinstance(op, Replace)
            and "weight" in op.tensors
        ):
            return op.tensors["weight"].shape[0]
    raise BadInputError(
        "the adapter saves part of a classification head but not its output layer's weight",
        path=base.path,
        fix="re-save the adapter with modules_to_save naming the whole head",
    )


def _task_config(base: Checkpoint, labels: int):
    """The base's config as a sequence classifier with `labels` labels (transformers' object)."""
    from transformers import CONFIG_MAPPING

    values = dict(base.config)
    if len(values.get("id2label") or {}) != labels:  # otherwise the base's own label names are kept
        values.pop("id2label", None)
        values.pop("label2id", None)
        values["num_labels"] = labels
    model_type = str(values["model_type"])
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedError(f"model_type {model_type!r} is unknown to transformers", path=base.path)
    try:
        return CONFIG_MAPPING[model_type].from_dict(values)
    except (TypeError, ValueError, KeyError) as exc:
        raise BadInputError(
            f"is not a valid {model_type} config ({exc})", path=base.path / "config.json"
        ) from None


def _meta_model(config, base: Checkpoint):
    """The sequence-classification model of this config, on the meta device (no memory)."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise UnsupportedError(
            f"transformers has no sequence classifier for model_type {config.model_type!r} ({exc})",
            path=base.path,
            fix="use the base the adapter was trained on, with its head",
        ) from None


def _head_placement(name: str, ir: AdapterIR, sites: list[Site], base: Checkpoint, arch: str) -> Placement:
    """The head module a task-model tensor belongs to; refuse a tensor nobody provides."""
    module, _, param = name.rpartition(".")
    placement = base.binder.resolve(module)
    if (
        placement is None
        or not (set(placement.module.roles) & HEAD_ROLES)
        or replaced_value(ir, placement, param) is None
    ):
        raise BadInputError(
            f"{arch} needs {name}, which neither the base nor the adapter holds "
            "(transformers would start it at random)",
            path=base.path,
            fix=f"use a base saved with {name} (its headless model, e.g. the one the adapter was trained on)",
        )
    return placement


def _check_shape(name: str, found: tuple, expected: tuple, path, where: str) -> None:
    if tuple(found) != tuple(expected):
        raise BadInputError(
            f"{name} has shape {list(found)} in {where}, but the classifier needs {list(expected)}",
            path=path,
            fix="use the base the adapter was trained on",
        )
