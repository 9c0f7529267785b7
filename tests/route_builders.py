"""Builders for the routing tests: PEFT adapters Arrow can route, and PEFT's Arrow model as reference."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model

from tests.builders import FAMILIES, load_model


def arrow_adapter(family: str, base: Path, path: Path, seed: int) -> Path:
    """A PEFT LoRA adapter with one dominant direction per module.

    PEFT's Arrow finds each prototype by 15 power iterations; with sigma_1 >> sigma_2 they converge
    to the exact top singular vector that Adaptrix computes, so the two routers agree.
    """
    torch.manual_seed(seed)
    targets = list(FAMILIES[family].targets)
    config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=targets)
    model = get_peft_model(load_model(family, base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
                param[0] *= 6.0
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    return path


def arrow_adapters(family: str, base: Path, root: Path, count: int = 3) -> list[Path]:
    """`count` routable adapters named task0, task1, ..."""
    return [arrow_adapter(family, base, root / f"task{i}", seed=10 + i) for i in range(count)]


@torch.no_grad()
def arrow_logits(family: str, base: Path, adapters: list[Path], inputs: dict, top_k: int,
                 temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The reference: PEFT's Arrow model over the adapters."""
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    model = create_arrow_model(load_model(family, base), [str(p) for p in adapters], config).eval()
    return model(**inputs).logits
