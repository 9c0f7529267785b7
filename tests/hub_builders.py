"""AdapterHub adapters for the tests: made on a fresh transformers model, perturbed, saved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import load_model, sample_inputs

# The `adapters` library builds these (and is the reference); without it (the transformers 5 job) every
# module importing this one is skipped: reading AdapterHub directories itself never needs it.
adapters = pytest.importorskip("adapters", reason='AdapterHub reference: pip install "adaptrix[adapterhub]"')
from adapters import (  # noqa: E402, F401  (after the skip above; the tests import them from here)
    ConfigUnion,
    DoubleSeqBnConfig,
    IA3Config,
    LoRAConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
)

NAME = "hub"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every adapter tensor away from its start (AdapterHub zeroes up-projections and LoRA B)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".adapters.{NAME}." in name or f".loras.{NAME}." in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def hub_model(
    family: str | None, base: Path, config, seed: int = 1, edit: Callable | None = None, model=None
) -> torch.nn.Module:
    """A fresh model of `base` with the adapter added, perturbed, edited, active, in eval mode."""
    model = load_model(family, base) if model is None else model
    adapters.init(model)  # mutates the model: never reuse one
    torch.manual_seed(seed)
    model.add_adapter(NAME, config=config)
    _perturb(model, seed)
    if edit is not None:
        edit(model)
    model.set_active_adapters(NAME)
    return model.eval()


def save_hub(family: str, base: Path, config, path: Path, **kwargs) -> tuple[Path, torch.Tensor]:
    """Save the adapter into `path`; return it with AdapterHub's own outputs on the sample inputs."""
    model = hub_model(family, base, config, **kwargs)
    model.save_adapter(str(path), NAME)
    return path, outputs(model, family)


@torch.no_grad()
def outputs(model: torch.nn.Module, family: str) -> torch.Tensor:
    """What the tests compare: logits, or for encoders the last hidden state (the tiny BERT's
    classifier logits are too small to show an adapter)."""
    if family == "bert":
        return model(**sample_inputs(family), output_hidden_states=True).hidden_states[-1]
    return model(**sample_inputs(family)).logits


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name."""
    return {n: p for n, p in model.named_parameters() if f".adapters.{NAME}." in n or f".loras.{NAME}." in n}


def share_layer_weights(model: torch.nn.Module) -> None:
    """Make every layer's output bottleneck use layer 0's modules (weights shared across layers)."""
    layers = model.model.layers if hasattr(model, "model") else model.bert.encoder.layer
    owner = (lambda layer: layer.output_adapters) if hasattr(model, "model") else (lambda layer: layer.output)
    first = owner(layers[0]).adapters[NAME]
    for layer in layers[1:]:
        mine = owner(layer).adapters[NAME]
        mine.adapter_down, mine.adapter_up = first.adapter_down, first.adapter_up


def zero_biases(model: torch.nn.Module) -> None:
    """Zero the bottleneck biases (an identity bottleneck on a bias-free projection then folds)."""
    with torch.no_grad():
        for name, param in adapter_tensors(model).items():
            if name.endswith("bias"):
                param.zero_()
