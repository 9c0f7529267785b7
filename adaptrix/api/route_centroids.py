"""Calibrated request-level routing: each adapter's centroid of the base's hidden states over example prompts.

`adaptrix.route` scores adapters by their Arrow prototypes and needs nothing but the artifact. A
few example prompts per adapter calibrate another router (`calibrate_route`): the base runs on
each example; each of its hidden states (the embeddings' and every layer's output) is averaged
over the prompt's tokens and scaled to unit length, and the example's feature is their
concatenation; an adapter's centroid is the mean of its examples' features (unit length).
`adaptrix.route(centroids, input_ids)` then sends a prompt to the adapter whose centroid is
nearest by cosine. The examples file is JSON:
{"adapter name": [[token ids], ...], ...}, one entry per adapter of the artifact.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptrix.api.route import Router, base_model, read_router
from adaptrix.calibration.prompts import is_token_lists
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["Centroids", "calibrate_route", "centroid_scores", "read_examples", "route_by_centroids"]


@dataclass(frozen=True, slots=True)
class Centroids:
    """A calibrated router: the artifact's adapters and their centroids [adapters, features], unit rows."""

    adapters: tuple[str, ...]
    vectors: torch.Tensor
    base: Path | None  # the base the artifact was compiled from, as its manifest records it

    def pick(self, input_ids: Sequence[int] | torch.Tensor, model: torch.nn.Module | None = None) -> str:
        """The adapter for one prompt (what adaptrix.route does with a Centroids)."""
        return route_by_centroids(self, input_ids, model)


def read_examples(path: Path | str) -> dict[str, list[list[int]]]:
    """An examples file: {adapter name: [[token ids], ...]}, every prompt non-empty."""
    raw = read_json(Path(path), what="route examples")
    fix = 'write {"ADAPTER": [[TOKEN_ID, ...], ...], ...}: a few prompts per adapter'
    if not isinstance(raw, dict) or not raw:
        raise BadInputError("expected an object of adapter names to lists of prompts", path=path, fix=fix)
    for name, prompts in raw.items():
        if not prompts or not is_token_lists(prompts, sys.maxsize):
            raise BadInputError(f"{name!r}: expected a non-empty list of prompts (lists of token ids)",
                                path=path, fix=fix)  # fmt: skip
    return raw


def calibrate_route(
    artifact: Path | str | Router,
    examples: Mapping[str, Sequence[Sequence[int]]] | Path | str,
    model: torch.nn.Module | None = None,
) -> Centroids:
    """Centroids of the base's mean hidden states over each adapter's example prompts.

    `artifact`: a routed or unmerged artifact (or its Router), whose adapters the examples must name,
    each at least once; `examples`: a mapping or an examples file; `model`: the base (None loads
    the one the artifact's manifest names).
    """
    router = artifact if isinstance(artifact, Router) else read_router(artifact)
    where = examples if isinstance(examples, (str, Path)) else None
    examples = read_examples(examples) if where is not None else examples
    missing, unknown = set(router.adapters) - set(examples), set(examples) - set(router.adapters)
    if missing or unknown:
        what = f"no examples for {sorted(missing)}" if missing else f"unknown adapters {sorted(unknown)}"
        raise BadInputError(f"{what}; the artifact routes {list(router.adapters)}", path=where,
                            fix="give example prompts for each of the artifact's adapters")  # fmt: skip
    model = base_model(router) if model is None else model
    vocab = model.get_input_embeddings().num_embeddings
    ids = [torch.as_tensor(prompt) for name in router.adapters for prompt in examples[name]]
    if any(t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab) for t in ids):
        raise BadInputError(
            f"an example prompt holds a token id outside the base's vocabulary (0..{vocab - 1})",
            path=where,
            fix="give token ids of the base's tokenizer",
        )
    vectors = []
    for name in router.adapters:
        if not examples[name]:
            raise BadInputError(f"no examples for {name!r}", path=where, fix="give one prompt or more")
        vectors.append(torch.stack([_mean_hidden(model, ids) for ids in examples[name]]).mean(0))
    unit = torch.nn.functional.normalize(torch.stack(vectors), dim=-1)
    return Centroids(router.adapters, unit, router.base)


def centroid_scores(
    centroids: Centroids, input_ids: Sequence[int] | torch.Tensor, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """Cosine of the prompt's feature (mean hidden states) with each adapter's centroid, [adapters]."""
    if model is None:
        model = base_model(Router(centroids.adapters, {}, 1, 1.0, centroids.base))
    hidden = torch.nn.functional.normalize(_mean_hidden(model, input_ids), dim=-1)
    return centroids.vectors @ hidden


def route_by_centroids(
    centroids: Centroids, input_ids: Sequence[int] | torch.Tensor, model: torch.nn.Module | None = None
) -> str:
    """The adapter whose centroid is nearest (cosine) to the prompt's feature."""
    return centroids.adapters[int(centroid_scores(centroids, input_ids, model).argmax())]


@torch.no_grad()
def _mean_hidden(model: torch.nn.Module, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Every hidden state (embeddings, each layer) averaged over the prompt's tokens, unit, concatenated."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise BadInputError(f"route takes one prompt of token ids, found shape {list(ids.shape)}",
                            fix="route each prompt on its own")  # fmt: skip
    device = next(model.parameters()).device
    states = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states
    means = [torch.nn.functional.normalize(h[0].to(torch.float32).mean(0), dim=-1) for h in states]
    return torch.cat(means).cpu() / len(means) ** 0.5
