"""Modules whose weight is another module's (tied): the checkpoint stores it once, under one name.

LUKE's masked-LM head `entity_predictions.decoder` computes with the entity embeddings' weight,
as a language-model head with the word embeddings'. The model built on the meta device shares
the Parameter objects, so the ties are read from it, as module names (prefix removed).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["tied_modules"]


def tied_modules(model, saved: Callable[[str], str], prefix: str) -> dict[str, tuple[str, ...]]:
    """Each module whose `weight` is shared, with the other modules sharing it."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module, _, kind = name.rpartition(".")
        if kind == "weight":
            groups.setdefault(id(param), []).append(saved(module).removeprefix(prefix))
    ties = {}
    for names in groups.values():
        for name in names if len(names) > 1 else ():
            ties[name] = tuple(other for other in names if other != name)
    return ties
