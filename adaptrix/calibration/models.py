"""The models calibration runs: a base as transformers loads it, with an adapter's deltas added.

Used by parity (the reference and the merged backend), refit and distill (source and target
models) and GPTQ (the merged model whose inputs it measures). Never the model's own code:
`trust_remote_code=False`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptrix.artifacts import find_module
from adaptrix.binders.table import Layout
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import AdapterIR
from adaptrix.lowering.module_pairs import low_rank_pairs

__all__ = ["add_pairs", "forward", "load_auto"]


def load_auto(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model a directory holds, by its config's architectures, in eval mode."""
    import transformers

    config = read_json(path / "config.json", what="config.json")
    architectures = [str(a) for a in config.get("architectures") or []]
    kind = transformers.AutoModel
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        kind = transformers.AutoModelForCausalLM
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        kind = transformers.AutoModelForSequenceClassification
    elif any(a.endswith("ForMaskedLM") for a in architectures):
        kind = transformers.AutoModelForMaskedLM
    elif config.get("is_encoder_decoder") and any(a.endswith("Generation") for a in architectures):
        kind = transformers.AutoModelForSeq2SeqLM
    return kind.from_pretrained(path, dtype=dtype, trust_remote_code=False).eval()


@torch.no_grad()
def forward(model: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (or an encoder's last hidden state) as float32.

    An encoder-decoder reads the ids on both sides (teacher forcing): the logits then depend on
    the encoder's, the decoder's and the cross-attention's modules.
    """
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in feeds:
        feeds = {**feeds, "decoder_input_ids": feeds["input_ids"]}
    output = model(**feeds)
    value = getattr(output, "logits", None)
    return (value if value is not None else output.last_hidden_state).float()


def add_pairs(model: torch.nn.Module, ir: AdapterIR, checkpoint: Checkpoint) -> torch.nn.Module:
    """Add the IR's low-rank deltas into the model's weights (in memory); returns the model."""
    for pair in low_rank_pairs(ir, checkpoint, torch.float32):
        module = find_module(model, pair.placement.name)
        delta = pair.down @ pair.up  # [in, out]
        weight = module.weight
        value = delta.T if pair.placement.module.layout is Layout.LINEAR else delta
        if tuple(value.shape) != tuple(weight.shape):
            raise BadInputError(f"refit: {pair.placement.name} has shape {list(weight.shape)}, "
                                f"the delta {list(value.shape)}")  # fmt: skip
        weight += value.to(weight.dtype)
    return model
