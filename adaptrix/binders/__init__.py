"""The registry of architecture binders, picked from a base's config.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from adaptrix.binders import (
    bart,
    bert,
    bloom,
    cohere,
    deberta_v2,
    falcon,
    gemma,
    gpt2,
    gpt_bigcode,
    gpt_neox,
    gptj,
    granite,
    llama,
    modernbert,
    moe,
    olmo,
    olmo2,
    opt,
    phi,
    phi3,
    smollm3,
    stablelm,
    starcoder2,
    t5,
)
from adaptrix.binders.table import Binder
from adaptrix.ir.errors import UnsupportedError
from adaptrix.ir.registry import registry

__all__ = ["BINDERS", "Binder", "binder_for_model_type"]


def _register(*binders: Binder) -> Mapping[str, Binder]:
    return registry("model_type", ((t, binder) for binder in binders for t in binder.model_types))


BINDERS = _register(
    gpt2.BINDER, llama.BINDER, gpt_neox.BINDER, phi3.BINDER, bert.BINDER,
    gemma.BINDER, moe.BINDER, phi.BINDER, olmo.BINDER, olmo2.BINDER, granite.BINDER,
    stablelm.BINDER, starcoder2.BINDER, falcon.BINDER, gptj.BINDER, opt.BINDER, bloom.BINDER,
    gpt_bigcode.BINDER, cohere.BINDER, smollm3.BINDER, deberta_v2.BINDER, modernbert.BINDER,
    t5.BINDER, bart.BINDER,
)  # fmt: skip


def binder_for_model_type(model_type: str, path: Path | str) -> Binder:
    """The binder for a model_type, or an error that lists the supported ones."""
    binder = BINDERS.get(model_type)
    if binder is None:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported",
            path=path,
            fix=f"supported model types: {', '.join(sorted(BINDERS))}",
        )
    return binder
