"""What a binder is: a table from an architecture's module names to roles, layouts and fused splits."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from adaptrix.binders.splits import Split, fuse_rows, split_rows
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import Role, SourceModel

__all__ = [
    "Binder",
    "BlockPoints",
    "Layout",
    "Module",
    "MultiQuery",
    "Packed",
    "Placement",
    "Split",
    "Stack",
    "fuse_rows",
    "split_rows",
]


class Layout(StrEnum):
    """How a module stores its weight."""

    LINEAR = "linear"  # nn.Linear: [out, in]
    CONV1D = "conv1d"  # GPT-2 Conv1D: [in, out]
    EMBEDDING = "embedding"  # nn.Embedding: [num, dim]
    NORM = "norm"  # LayerNorm / RMSNorm: [dim]


@dataclass(frozen=True, slots=True)
class Packed:
    """Where a stored weight lives in the model transformers 5 loads: rows of one of a module's parameters.

    Mixtral's `block_sparse_moe.experts.3.w1.weight` is rows 0 .. I of expert 3 of the loaded
    `mlp.experts.gate_up_proj` [E, 2I, H]; a router's weight (`mlp.gate`, a module that is no
    nn.Linear) is all rows of its `weight` (expert None). `module` is the loaded module's name in
    its layer.
    """

    module: str
    param: str
    expert: int | None
    rows: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Module:
    """One module of the architecture: its roles (several when fused) and weight layout."""

    roles: tuple[Role | str, ...]
    layout: Layout = Layout.LINEAR
    split: Split | None = None
    shape: tuple[int, ...] | None = None  # a module role's stored weight shape, from the module tree
    packed: Packed | None = None  # where the loaded model keeps the weight, where no module holds it

    @property
    def is_linear(self) -> bool:
        """Whether PEFT's "all-linear" would target it (projections, not heads, not packed experts)."""
        return (self.layout in (Layout.LINEAR, Layout.CONV1D) and self.packed is None
                and not (set(self.roles) & {Role.LM_HEAD, Role.CLS_HEAD}))  # fmt: skip


@dataclass(frozen=True, slots=True)
class BlockPoints:
    """Where a bottleneck adapter meets one block of a layer, as modules the hooks runtime can hook.

    Names are relative to the layer. `block`'s output is what the layer adds to its residual
    stream (Llama: the attention / MLP output h) or, with `norm`, LN(h + r) (BERT's
    BertSelfOutput / BertOutput). `output`'s output is h. The residual r is argument
    `residual_arg` of `residual`'s forward. `projection` is the module whose weight h comes from.
    """

    block: str
    output: str
    residual: str
    residual_arg: int
    projection: str
    norm: str | None = None


@dataclass(frozen=True, slots=True)
class MultiQuery:
    """A config flag by which every query head shares one key/value head (Falcon, GPTBigCode).

    `default`: the flag's value when config.json leaves it out; `unless`: a flag that turns the
    rule off (Falcon's new_decoder_architecture, whose kv heads are num_kv_heads).
    """

    flag: str
    default: bool
    unless: str | None = None

    def applies(self, config: Mapping[str, object]) -> bool:
        """Whether this config has a single key/value head."""
        return bool(config.get(self.flag, self.default)) and not (self.unless and config.get(self.unless))


@dataclass(frozen=True, slots=True)
class Stack:
    """A layer stack of several (encoder-decoders) with its own table; `Binder.bind` numbers its layers."""

    container: str
    count_keys: tuple[str, ...]
    layer_modules: Mapping[str, Module]
    optional_modules: frozenset[str] = frozenset()
    start: int | None = None  # its first layer, layers numbered across the stacks in order
    count: int | None = None  # from the first of the config's count_keys that is set

    def match(self, name: str) -> re.Match[str] | None:
        """The layer number and the key inside the layer of a module name in this stack, or None."""
        return re.match(rf"^(?:.*\.)?{re.escape(self.container)}\.(\d+)\.(.+)$", name)


@dataclass(frozen=True, slots=True)
class Placement:
    """A module name resolved by a binder."""

    name: str
    layer: int | None
    key: str
    module: Module


@dataclass(frozen=True, slots=True)
class Binder:
    """An architecture family as data: names, layer container, layouts, fused splits, config keys."""

    name: str
    model_types: tuple[str, ...]
    layer_container: str
    layer_modules: Mapping[str, Module]
    model_modules: Mapping[str, Module]
    config_keys: Mapping[str, tuple[str, ...]]
    tie_default: bool = False
    lm_head_weight: str = "lm_head.weight"
    bottleneck_points: Mapping[str, BlockPoints] = field(default_factory=dict)  # by BottleneckBlock
    tree_source: SourceModel | None = None  # the dimensions, where the module tree gave them
    roles_table: bool = True  # whether a table gave the semantic roles (False: module roles only)
    tree_tensors: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # the tree's names
    aliases: Mapping[str, str] = field(default_factory=dict)  # a model-level key -> the checkpoint's key
    layer_aliases: Mapping[str, str] = field(default_factory=dict)  # a loaded layer key -> the checkpoint's
    # The loaded model's modules whose parameters hold packed weights (Packed), each with its
    # parameters in registration order and their shapes: what PEFT's target_parameters wraps.
    packed_params: Mapping[str, tuple[tuple[str, tuple[int, ...]], ...]] = field(default_factory=dict)
    ties: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # a model-level key -> its weight's sharers
    multi_query: MultiQuery | None = None  # a config flag that leaves one kv head (Falcon, GPTBigCode)
    # Layer modules that some layers or some variants of the family lack (ModernBERT's layer 0 has
    # no attn_norm; StableLM's parallel residual has no post_attention_layernorm).
    optional_modules: frozenset[str] = frozenset()
    # Several layer stacks (encoder-decoders), each with its own table (layer_modules empty); see `bind`
    stacks: tuple[Stack, ...] = ()
    same_sizes: tuple[tuple[str, str], ...] = ()  # config keys read as one size; else: the tree alone
    _layer_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Freeze the tables and compile the layer pattern."""
        object.__setattr__(self, "layer_modules", MappingProxyType(dict(self.layer_modules)))
        object.__setattr__(self, "model_modules", MappingProxyType(dict(self.model_modules)))
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))
        object.__setattr__(self, "layer_aliases", MappingProxyType(dict(self.layer_aliases)))
        object.__setattr__(self, "packed_params", MappingProxyType(dict(self.packed_params)))
        object.__setattr__(self, "ties", MappingProxyType(dict(self.ties)))
        object.__setattr__(self, "config_keys", MappingProxyType(dict(self.config_keys)))
        object.__setattr__(self, "bottleneck_points", MappingProxyType(dict(self.bottleneck_points)))
        object.__setattr__(self, "optional_modules", frozenset(self.optional_modules))
        pattern = rf"^(?:.*\.)?{re.escape(self.layer_container)}\.(\d+)\.(.+)$"
        object.__setattr__(self, "_layer_re", re.compile(pattern))

    def bind(self, config: Mapping[str, object], path: Path) -> Binder:
        """The binder of one model: its layer stacks numbered from its config's layer counts."""
        if not self.stacks:
            return self
        stacks, start = [], 0
        for stack in self.stacks:
            value = next((config[k] for k in stack.count_keys if config.get(k) is not None), None)
            if value is None:
                raise BadInputError(f"has no {' or '.join(stack.count_keys)}", path=path,
                                    fix=f"a {self.name} config.json needs it")  # fmt: skip
            count = int(_dimension(value, stack.count_keys[0], path))
            stacks.append(dataclasses.replace(stack, start=start, count=count))
            start += count
        return dataclasses.replace(self, stacks=tuple(stacks))

    def resolve(self, name: str) -> Placement | None:
        """Place a module name (any prefix) in this architecture, or None if it has no role."""
        match, first = self._layer_re.match(name), 0
        container, table = self.layer_container, self.layer_modules
        for stack in self.stacks if match is None else ():
            if (match := stack.match(name)) is not None:
                if stack.start is None:
                    raise ValueError(f"binder {self.name} is not bound to a config: call bind()")
                container, table, first = stack.container, stack.layer_modules, stack.start
                break
        parts = name.split(".")
        starts = len(parts)
        if match:
            key = self.layer_aliases.get(match.group(2), match.group(2))
            module = table.get(key)
            if module is not None:
                return Placement(name, first + int(match.group(1)), key, module)
            # inside a layer, only a model-level key that names the layer too may match
            starts = name[: match.start(1) - len(container) - 1].count(".") + 1
        for start in range(starts):  # the longest key that ends the name
            key = ".".join(parts[start:])
            if (module := self.model_modules.get(key)) is not None:
                return Placement(name, None, self.aliases.get(key, key), module)
        return None

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer, name inside the layer) of a module name in the layer stack, or None."""
        match = self._layer_re.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def roles(self) -> list[str]:
        """Every module key this binder knows, layer modules first."""
        return [*self.layer_modules, *(k for s in self.stacks for k in s.layer_modules), *self.model_modules]

    def source_model(self, config: Mapping[str, object], path: Path) -> SourceModel:
        """Read the dimensions from a config.json's contents."""
        if self.tree_source is not None:
            return self.tree_source
        values = {key: _dimension(self._config_value(config, key, path), key, path)
                  for key in self.config_keys if key != "num_layers" or not self.stacks}  # fmt: skip
        hidden, heads = int(values["hidden_size"]), int(values["num_heads"])
        kv_heads = values.get("num_kv_heads") or heads
        if self.multi_query is not None and self.multi_query.applies(config):
            kv_heads = 1
        head_dim = values.get("head_dim") or hidden // heads
        inter = values.get("intermediate_size") or 4 * hidden
        tie = config.get("tie_word_embeddings", self.tie_default)
        layers, decoder_start = self._layer_counts(config, path, values)
        return SourceModel(
            arch=str(config["model_type"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(inter),
            vocab_size=int(values["vocab_size"]),
            tie_word_embeddings=bool(tie),
            decoder_start=decoder_start,
        )

    def _layer_counts(self, config: Mapping[str, object], path: Path, values: Mapping[str, object]):
        """(all layers, the decoder's first layer or None): the stacks' counts, else num_layers."""
        if not self.stacks:
            return int(values["num_layers"]), None
        stacks = self.bind(config, path).stacks
        return sum(int(s.count or 0) for s in stacks), stacks[-1].start

    def _config_value(self, config: Mapping[str, object], key: str, path: Path) -> object:
        for name in self.config_keys[key]:
            if config.get(name) is not None:
                return config[name]
        if key in ("num_kv_heads", "head_dim", "intermediate_size"):
            return None
        names = " or ".join(self.config_keys[key])
        raise BadInputError(f"has no {names}", path=path, fix=f"a {self.name} config.json needs it")


def _dimension(value: object, key: str, path: Path) -> object:
    """A config dimension as a positive int (None where the config may leave it out)."""
    if value is None:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not float(value).is_integer() or value < 1:
        raise BadInputError(f"has {key} = {value!r}; expected a positive integer", path=path,
                            fix="restore the config.json the model was saved with")  # fmt: skip
    return int(value)
