"""The generic binder: a base's modules read from its own module tree, built on the meta device.

For a family without a table, and for the modules a family's table does not name (MoE experts,
routers, extra norms), transformers builds the model from its config on the meta device: no
weights are read and no memory is taken. Each module with a weight becomes a module role: its
name inside its layer (one layer stack) or inside the model, with its layout (Linear, Conv1D,
Embedding, norm) and its weight's shape. That is all a LoRA-style merge or hook needs, as PEFT
places a LoRA on any module. Semantic roles (attn_q, mlp_down, ...) come only from tables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from adaptrix.artifacts import renamed
from adaptrix.binders.packed import load_renamings, packed_table
from adaptrix.binders.table import Binder, Layout, Module
from adaptrix.binders.ties import tied_modules
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import ROLE_VALUES, Role, SourceModel

__all__ = ["GENERIC_CONFIG_KEYS", "tree_binder"]

logger = logging.getLogger(__name__)

# Where a config keeps each dimension, whatever the family calls it (transformers' attribute maps).
GENERIC_CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_kv", "kv_channels"),
    "intermediate_size": (
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "d_ff",
        "encoder_ffn_dim",
        "ffn_hidden_size",
    ),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
                     "decoder_layers", "num_decoder_layers")  # fmt: skip
_MAX_LAYERS = 4096  # a config asking for more is refused before anything is built
_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")


def tree_binder(config: Mapping[str, object], path: Path, table: Binder | None) -> Binder:
    """A binder for the base `config` describes: `table`'s roles, the module tree's for the rest."""
    key = (json.dumps(config, sort_keys=True, default=str), str(path), table.name if table else None)
    if key not in _BUILT:
        while len(_BUILT) >= _CACHED:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = _from_modules(_meta_model(config, path), config, path, table)
    return _BUILT[key]


_CACHED = 16
_BUILT: dict[tuple[str, str, str | None], Binder] = {}


def _meta_model(config: Mapping[str, object], file: Path):
    """The model config.json describes, built on the meta device (no weights, no memory)."""
    from transformers import AutoModel, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(config["model_type"])
    for name in _LAYER_COUNT_KEYS:
        count = config.get(name)
        if isinstance(count, int) and not isinstance(count, bool) and count > _MAX_LAYERS:
            raise BadInputError(
                f"has {name} = {count}; Adaptrix reads models of at most {_MAX_LAYERS} layers",
                path=file, fix="restore the config.json the model was saved with",
            )  # fmt: skip
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedError(
            f"has model_type {model_type!r}, which this transformers does not know",
            path=file, fix="install a transformers release that has the family",
        )  # fmt: skip
    try:
        settings = CONFIG_MAPPING[model_type].from_dict(dict(config))
        cls = _model_class(config, type(settings)) or AutoModel._model_mapping[type(settings)]
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise TypeError(f"{cls!r} is not a transformers model class")
        return _build_empty(cls, settings)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ImportError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedError(
            f"describes a {model_type} model transformers cannot build ({message[:200]})",
            path=file, fix="re-save the base with save_pretrained",
        ) from None  # fmt: skip


def _build_empty(cls: type, settings: object):
    """The model with every tensor on the meta device, or only its parameters there.

    Some families compute buffers at init from tensors that cannot be meta ones: their buffers
    are built for real (they are small: rotary tables, masks).
    """
    from accelerate import init_empty_weights

    try:
        with torch.device("meta"):
            return cls._from_config(settings, attn_implementation="eager", dtype=torch.float32)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        logger.debug("building %s on the meta device: %s; buffers are built for real", cls.__name__, exc)
    with init_empty_weights(include_buffers=False):
        return cls._from_config(settings, attn_implementation="eager", dtype=torch.float32)


def _model_class(config: Mapping[str, object], settings: type) -> type | None:
    """The transformers class the config's `architectures` names (never code from the model's files).

    Only a class of the config's own family counts: a LlamaForCausalLM named by a config of
    another model_type is not built from it.
    """
    import transformers

    names = config.get("architectures")
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and _CLASS_NAME.fullmatch(name):
            try:
                cls = getattr(transformers, name)
            except (AttributeError, ImportError, RuntimeError):
                cls = None
            if getattr(cls, "config_class", None) is settings:
                return cls
            logger.warning("%s is no model class of %s; the base is read as a bare model",
                           name, settings.__name__)  # fmt: skip
    return None


def _layout(module) -> Layout | None:
    """How a module stores its weight, or None for a module no LoRA-style adapter changes."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if isinstance(module, Conv1D):
        return Layout.CONV1D
    if isinstance(module, nn.Linear):
        return Layout.LINEAR
    if isinstance(module, nn.Embedding):
        return Layout.EMBEDDING
    return Layout.NORM if weight.dim() == 1 else None


def _stacks(model) -> list[str]:
    """The outermost module lists of identical blocks: the model's layer stacks."""
    from torch import nn

    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(name.startswith(stack + ".") for stack in found):
            continue
        if len({type(child) for child in module}) == 1 and any(True for _ in module[0].parameters()):
            found.append(name)
    return found


def _from_modules(model, config: Mapping[str, object], file: Path, table: Binder | None) -> Binder:
    """The binder: `table`'s modules, plus every other module with a weight as a module role."""
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    saved = _saved_names(model)
    stacks = _stacks(model)
    stack = saved(stacks[0]).removeprefix(prefix) if len(stacks) == 1 else None
    if table is not None and stack is not None and stack.rpartition(".")[2] != table.layer_container:
        stack = None
    # the stack's last name, as tables do: a checkpoint's and an adapter's names may differ above it
    container = table.layer_container if table is not None else (stack or "").rpartition(".")[2]
    embed, head = _embedding_names(model)
    layer_modules: dict[str, Module] = dict(table.layer_modules) if table else {}
    model_modules: dict[str, Module] = dict(table.model_modules) if table else {}
    shapes: dict[tuple[bool, str], set[tuple[int, ...]]] = {}
    layouts: dict[tuple[bool, str], Layout] = {}
    aliases: dict[str, str] = {}  # a model-level module's name in memory -> its name in the checkpoint
    for name, module in model.named_modules():
        layout = _layout(module)
        if layout is None or (table is not None and table.resolve(saved(name)) is not None):
            continue
        canonical = saved(name).removeprefix(prefix)
        in_layer = stack is not None and canonical.startswith(stack + ".")
        key = canonical.removeprefix(stack + ".").partition(".")[2] if in_layer else canonical
        if not in_layer and name.removeprefix(prefix) != key:
            aliases[name.removeprefix(prefix)] = key
        if not in_layer and name in (embed, head):
            weight_shape = tuple(module._parameters["weight"].shape)
            role = Role.EMBED if name == embed else Role.LM_HEAD
            model_modules[key] = Module((role,), layout, shape=weight_shape)
            continue
        shapes.setdefault((in_layer, key), set()).add(tuple(module._parameters["weight"].shape))
        layouts[(in_layer, key)] = layout
    for (in_layer, key), layout in layouts.items():
        found = shapes[(in_layer, key)]
        role = key if key not in ROLE_VALUES else f"module.{key}"
        shape = next(iter(found)) if len(found) == 1 else None
        (layer_modules if in_layer else model_modules)[key] = Module((role,), layout, shape=shape)
    aliases = {alias: key for alias, key in aliases.items() if alias not in model_modules}
    for alias, key in aliases.items():  # an adapter names modules as the model in memory has them
        model_modules[alias] = model_modules[key]
    packed = packed_table(model, saved, _layout, stacks[0] if stack is not None else None)
    layer_modules.update(packed.layer_modules)
    head_weight = f"{saved(head).removeprefix(prefix)}.weight" if head else "lm_head.weight"
    source = table.source_model(config, file) if table else _source(model, config, stacks)
    return dataclasses.replace(
        table or Binder(name=str(config["model_type"]), model_types=(str(config["model_type"]),),
                        layer_container=container, layer_modules={}, model_modules={},
                        config_keys=GENERIC_CONFIG_KEYS),
        layer_container=container or "\0",  # no stack: nothing matches
        layer_modules=layer_modules,
        model_modules=model_modules,
        lm_head_weight=table.lm_head_weight if table and _has_head(table) else head_weight,
        tree_source=source,
        roles_table=table is not None,
        tree_tensors=_tensor_names(model, prefix, saved) | packed.tensors,
        aliases=aliases,
        layer_aliases=packed.layer_aliases,
        packed_params=packed.packed_params,
        ties=tied_modules(model, saved, prefix),
    )  # fmt: skip


def _saved_names(model):
    """A module name as save_pretrained writes it: the class's checkpoint conversion mapping, reversed.

    Some classes (Gemma 3n's) load checkpoints under other names than their modules'; transformers
    renames on load and back on save, with the class's own patterns (library code, not input).
    """
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    reverse = [(value, re.sub(r"\(.*\)", "", key.lstrip("^"))) for key, value in mapping.items()]
    reverse += load_renamings(model)  # transformers 5's, for classes that pack weights on load
    return lambda name: renamed(name, reverse)


def _tensor_names(model, prefix: str, saved) -> frozenset[str]:
    """Every parameter and buffer name of the model (tied ones under each name), with and without prefix."""
    names = [saved(name) for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [saved(name) for name, _ in model.named_buffers(remove_duplicate=False)]
    return frozenset(names) | frozenset(name.removeprefix(prefix) for name in names)


def _has_head(table: Binder) -> bool:
    return any(module.roles == (Role.LM_HEAD,) for module in table.model_modules.values())


def _embedding_names(model) -> tuple[str | None, str | None]:
    """The module names of the input embedding and of the output head (None where there is none)."""
    names = {id(module): name for name, module in model.named_modules()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    embed = embed if isinstance(embed, torch.nn.Module) else None
    head = head if isinstance(head, torch.nn.Module) else None
    return (names.get(id(embed)) if embed is not None else None,
            names.get(id(head)) if head is not None else None)  # fmt: skip


def _source(model, config: Mapping[str, object], stacks: list[str]) -> SourceModel:
    """The dimensions of a family without a table: the config's, else the module tree's."""
    settings = model.config
    layers = sum(len(model.get_submodule(stack)) for stack in stacks) if stacks else 0

    def value(name: str, default: int) -> int:
        for key in GENERIC_CONFIG_KEYS[name]:
            found = getattr(settings, key, None)
            if isinstance(found, int) and not isinstance(found, bool) and found > 0:
                return found
        return default

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    vocab, hidden = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else (1, 1)
    hidden = value("hidden_size", hidden)
    heads = value("num_heads", 1)
    return SourceModel(
        arch=str(config["model_type"]),
        hidden_size=hidden,
        num_layers=layers or value("num_layers", 1),
        num_heads=heads,
        num_kv_heads=value("num_kv_heads", heads),
        head_dim=value("head_dim", max(hidden // heads, 1)),
        intermediate_size=value("intermediate_size", 4 * hidden),
        vocab_size=value("vocab_size", vocab),
        tie_word_embeddings=bool(getattr(settings, "tie_word_embeddings", False)),
    )
