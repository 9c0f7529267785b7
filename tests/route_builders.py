"""Builders for the routing tests: PEFT adapters Arrow can route, and PEFT's Arrow model as reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model
from safetensors.torch import load_file, save_file

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


DOMAINS = ((3, 7), (50, 54), (100, 104))  # token-id ranges of three synthetic domains


def domain_prompts(domain: int, count: int = 4, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Prompts [count, length] of token ids from one domain's range."""
    low, high = DOMAINS[domain]
    return torch.randint(low, high, (count, length), generator=torch.Generator().manual_seed(seed + domain))


@torch.no_grad()
def _mean_inputs(model, targets: tuple[str, ...], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean input of every targeted module over the prompts' tokens."""
    found, removers = {}, []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            hook = (
                lambda n: lambda m, args: found.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).mean(0))
            )(name)
            removers.append(module.register_forward_pre_hook(hook))
    model(input_ids=ids)
    for remover in removers:
        remover.remove()
    return found


def _keep_mean(found: dict, name: str):
    """A forward pre-hook storing the mean of the module's input over its tokens under `name`."""

    def hook(module, args):
        found[name] = args[0].reshape(-1, args[0].shape[-1]).mean(0)

    return hook


def domain_adapters(family: str, base: Path, root: Path) -> list[Path]:
    """One adapter per domain whose every module's top direction is that domain's mean input (centered).

    Request-level routing should send each domain's prompts to its own adapter.
    """
    targets = tuple(FAMILIES[family].targets)
    model = load_model(family, base)
    means = [_mean_inputs(model, targets, domain_prompts(d)) for d in range(len(DOMAINS))]
    paths = []
    for domain, own in enumerate(means):
        torch.manual_seed(domain)
        config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=list(targets))
        peft_model = get_peft_model(load_model(family, base), config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" not in name:
                    continue
                module = name.removeprefix("base_model.model.").split(".lora_A")[0]
                direction = own[module] - sum(m[module] for m in means) / len(means)
                param.mul_(0.01)
                param[0] = direction / direction.norm()
        paths.append(root / f"domain{domain}")
        peft_model.save_pretrained(paths[-1])
    return paths


def padded_adapter(adapter: Path, path: Path, extra: int = 2) -> Path:
    """The same adapter at rank r + extra (zero rows of A, zero columns of B, alpha keeping alpha / r)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = config["r"]
    config.update(r=rank + extra, lora_alpha=config["lora_alpha"] * (rank + extra) / rank)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key, value in tensors.items():
        if "lora_A" in key:
            tensors[key] = torch.cat([value, value.new_zeros(extra, value.shape[1])])
        elif "lora_B" in key:
            tensors[key] = torch.cat([value, value.new_zeros(value.shape[0], extra)], dim=1)
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path
