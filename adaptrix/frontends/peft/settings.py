"""LoraSettings: what an adapter_config.json decides, with PEFT's own targeting and scaling rules.

PEFT is not imported here: `import peft` takes seconds and hundreds of MB (it imports all of
transformers), which a streaming compile cannot afford. The rules below follow PEFT 0.21's
`check_target_module_exists`, `get_pattern_key` and `LoraLayer.update_layer`; tests check them
against those functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from adaptrix.frontends.peft import patterns
from adaptrix.ir.errors import BadInputError

__all__ = ["MAX_SCALE", "LoraSettings", "pattern_key"]

# A scale (alpha / r) beyond this is not a trained adapter but a broken or hostile config: merged,
# it turns float16 weights into inf. Trained LoRAs use 0.1 to a few hundred.
MAX_SCALE = 1e6


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """The parts of a LoRA adapter_config.json that decide what the adapter computes."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: tuple[str, ...] | str | None
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | int | None
    layers_pattern: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    bias: str
    use_dora: bool
    lora_bias: bool
    fan_in_fan_out: bool
    peft_type: str = "LORA"
    feedforward_modules: tuple[str, ...] | str | None = None  # IA3: the modules whose input is scaled
    projection_prng_key: int = 0  # VeRA: the seed of the shared projections
    save_projection: bool = True  # VeRA: whether the shared projections are in the adapter file
    task_type: str | None = None  # SEQ_CLS lets a saved classifier head come with the adapter
    target_parameters: tuple[str, ...] = ()  # parameters PEFT wraps (ParamWrapper): MoE experts, routers

    def targets_parameter(self, key: str) -> bool:
        """Whether PEFT's target_parameters wraps parameter `key` (its name inside the base model)."""
        return any(key == t or key.endswith(f".{t}") for t in self.target_parameters)

    def rank(self, key: str) -> int:
        """The rank PEFT gives module `key` (rank_pattern first, then r)."""
        return int(self.rank_pattern.get(pattern_key(self.rank_pattern, key), self.r))

    def alpha(self, key: str) -> float:
        """The alpha PEFT gives module `key` (alpha_pattern first, then lora_alpha)."""
        return float(self.alpha_pattern.get(pattern_key(self.alpha_pattern, key), self.lora_alpha))

    def scale(self, key: str) -> float:
        """LoRA's scale for module `key`: alpha / r, or alpha / sqrt(r) with rsLoRA; refused if absurd."""
        rank, alpha = self.rank(key), self.alpha(key)
        if rank <= 0:
            raise BadInputError(
                f"gives module {key!r} rank {rank}; expected a positive integer", path=self.path
            )
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise BadInputError(
                f"gives module {key!r} the scale {scale:g} (alpha {alpha:g}, r {rank}); a trained "
                f"adapter's is far below {MAX_SCALE:g}",
                path=self.path,
                fix="fix lora_alpha / alpha_pattern / r in adapter_config.json",
            )
        return scale

    def feedforward(self, key: str) -> bool:
        """IA3: whether PEFT treats module `key` as feedforward (its input is scaled, not its output)."""
        found = self.feedforward_modules
        if not found:
            return False
        if isinstance(found, str):
            return patterns.fullmatch(found, key)
        return any(key.endswith(name) for name in found)

    def saves(self, key: str) -> bool:
        """Whether module `key` lies inside a modules_to_save entry."""
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in self.modules_to_save)

    def targets(self, key: str, is_linear: bool) -> bool:
        """Whether PEFT puts LoRA on module `key` (the module name inside the base model)."""
        if self._excluded(key) or self.saves(key):
            return False
        if self.target_modules is None:
            return False
        if self.target_modules == "all-linear":
            return is_linear
        if isinstance(self.target_modules, str):
            return patterns.fullmatch(self.target_modules, key)
        if key in self.target_modules:
            return True
        found = any(key.endswith(f".{t}") for t in self.target_modules)
        layers = self.layers_to_transform
        if not found or layers is None or (isinstance(layers, tuple) and not layers):
            return found
        index = patterns.layer_index(self.layers_pattern, key)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def _excluded(self, key: str) -> bool:
        excluded = self.exclude_modules
        if not excluded:
            return False
        if isinstance(excluded, str):
            return patterns.fullmatch(excluded, key)
        return key in excluded or any(key.endswith(f".{e}") for e in excluded)


def pattern_key(found: dict, key: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches the end of `key`, else `key`."""
    return patterns.pattern_key(found, key)
