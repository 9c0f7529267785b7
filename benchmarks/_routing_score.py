"""The routing study's scorers: per prompt, is the greedy answer exact, for each way of serving it.

Every scorer returns {domain: bool array over that domain's scored prompts}. Prompts of one domain
share a length, so each domain is one batch; a token-level router sees each token on its own, so
batching changes nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _routing_data import BOS, DOMAINS, TASKS, encode
from _routing_models import correct, load

CALIBRATION_EXAMPLES, CALIBRATION_SEED = 8, 4321


def cross(base: Path, adapters: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """cross[adapter][domain]: every domain's prompts served by every single adapter (PEFT, unmerged)."""
    from peft import PeftModel

    found = {}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(load(base), path).eval()
        found[name] = {d: correct(model, TASKS[d]) for d in DOMAINS}
    return found


def bare(base: Path) -> dict[str, np.ndarray]:
    """The base without any adapter."""
    model = load(base)
    return {d: correct(model, TASKS[d]) for d in DOMAINS}


def merged(base: Path, adapters: dict[str, Path]) -> dict[str, np.ndarray]:
    """One adapter: the average of all deltas (PEFT add_weighted_adapter, cat, weight 1/n each: exact)."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "average", combination_type="cat")
    model.set_adapter("average")
    model.eval()
    return {d: correct(model, TASKS[d]) for d in DOMAINS}


def peft_arrow_model(base: Path, adapters: dict[str, Path], top_k: int, exact: bool = False):
    """PEFT's Arrow model over the adapters (task_i is the i-th of `adapters`), temperature 1.

    PEFT finds each prototype by 15 power iterations from a seeded random vector; `exact` replaces
    them, after the first forward built them, by the top right singular vector from an SVD.
    """
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    paths = [str(p) for p in adapters.values()]
    model = create_arrow_model(load(base), task_specific_adapter_paths=paths, arrow_config=config).eval()
    if exact:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[BOS]]))
        for module in model.modules():
            arrows = getattr(module, "lora_arrow", None)
            if arrows is not None and "arrow_router" in arrows:
                arrow = arrows["arrow_router"]
                pairs = [(module.lora_A[n].weight, module.lora_B[n].weight) for n in arrow.task_adapter_names]
                arrow.prototypes = torch.stack([torch.linalg.svd(b @ a).Vh[0] for a, b in pairs]).detach()
    return model


def peft_arrow(base: Path, adapters: dict[str, Path], top_k: int, exact: bool = False) -> dict:
    """Token-level Arrow routing, PEFT's create_arrow_model."""
    model = peft_arrow_model(base, adapters, top_k, exact)
    return {d: correct(model, TASKS[d]) for d in DOMAINS}


def attached(model, bundle: Path) -> dict[str, np.ndarray]:
    """The domains' prompts through `model` with a hooks bundle attached."""
    import adaptrix

    handle = adaptrix.attach(model, bundle)
    try:
        return {d: correct(model, TASKS[d]) for d in DOMAINS}
    finally:
        handle.detach()


def request_level(choose: Callable[[np.ndarray], str], table: dict) -> tuple[dict, dict]:
    """Route each prompt with `choose(input_ids) -> adapter name`; score it with that adapter alone.

    Returns (correct per domain, chosen adapter per domain); `table` is cross()'s result.
    """
    results, chosen = {}, {}
    for d in DOMAINS:
        prompts, _ = TASKS[d].scored()
        picks = [choose(row) for row in prompts]
        chosen[d] = np.array(picks)
        results[d] = np.array([table[p][d][i] for i, p in enumerate(picks)], dtype=bool)
    return results, chosen


def calibration_prompts(count: int = CALIBRATION_EXAMPLES, seed: int = CALIBRATION_SEED) -> dict[str, list]:
    """`count` training-draw prompts per domain (token ids with <bos>, without answers)."""
    rng = np.random.default_rng(seed)
    return {d: [[BOS, *encode(p)] for p, _ in TASKS[d].examples(rng, count)] for d in DOMAINS}


def token_picks(routed: Path, base: Path) -> dict[str, float]:
    """Per domain: share of Arrow's top-1 choices (tokens of prompt + answer x routed modules) that pick
    the domain's own adapter, with the routed artifact's stored prototypes."""
    from adaptrix.api.route import module_inputs, read_router

    router, model, found = read_router(routed), load(base), {}
    for d in DOMAINS:
        prompts, answers = TASKS[d].scored()
        ids = torch.from_numpy(np.concatenate([prompts, answers], axis=1))
        inputs = module_inputs(model, list(router.prototypes), ids)
        own = router.adapters.index(d)
        picks = [(x @ router.prototypes[name].T).abs().argmax(-1) == own for name, x in inputs.items()]
        found[d] = float(torch.cat(picks).float().mean())
    return found


def routed_share(chosen: dict[str, np.ndarray]) -> float:
    """Share of prompts routed to their own domain's adapter (adapters are named after domains)."""
    hits = sum(int((chosen[d] == d).sum()) for d in DOMAINS)
    return hits / sum(len(chosen[d]) for d in DOMAINS)


__all__ = ["attached", "bare", "calibration_prompts", "cross", "merged", "peft_arrow",
           "peft_arrow_model", "request_level", "routed_share", "token_picks"]  # fmt: skip
