"""The registry of passes: each is a named IR -> IR rewrite with typed options."""

from __future__ import annotations

from collections.abc import Mapping

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.registry import registry
from adaptrix.passes.base import Pass, PassResult, parse_options
from adaptrix.passes.combine import CombineOptions, combine
from adaptrix.passes.distill import DistillOptions, distill
from adaptrix.passes.fold_blend import FoldBlendOptions, fold_blend
from adaptrix.passes.fuse_hybrid import FuseHybridOptions, fuse_hybrid
from adaptrix.passes.project import ProjectOptions, project
from adaptrix.passes.redistribute import RedistributeOptions, redistribute
from adaptrix.passes.reduce_rank import ReduceRankOptions, reduce_rank
from adaptrix.passes.refit import RefitOptions, refit
from adaptrix.passes.route import RouteOptions, route

__all__ = ["PASSES", "Pass", "PassResult", "parse_pass", "pass_named", "register"]


def register(*passes: Pass) -> Mapping[str, Pass]:
    """A read-only table of passes by name; a name registered twice is an error."""
    return registry("pass", ((spec.name, spec) for spec in passes))


_ONE_STACK = "this pass reads layers as one stack and would move deltas between the encoder and the decoder"
_CALIBRATION = "this pass runs the models on prompts as decoders or encoders, not as encoder-decoders"

PASSES = register(
    Pass("fold-blend", "fold out = (1-alpha)*base + alpha*adapted into the deltas (exact)",
         FoldBlendOptions, fold_blend),
    Pass("reduce-rank", "truncated SVD of each low-rank delta to a rank or an energy share",
         ReduceRankOptions, reduce_rank),
    Pass("combine", "several adapters into one: linear, cat, svd, ties, dare_linear, dare_ties",
         CombineOptions, combine, several=True),
    Pass("redistribute", "per-layer deltas onto another depth or chosen layers (each role's total kept)",
         RedistributeOptions, redistribute, uses_base=True, no_encoder_decoder=_ONE_STACK),
    Pass("project", "deltas to the base's hidden / intermediate sizes and heads: svd, truncate, interpolate",
         ProjectOptions, project, uses_base=True, roles=True, no_encoder_decoder=_ONE_STACK),
    Pass("refit", "LoRA A factors refit on data for a base of the same shape (trained further, tuned)",
         RefitOptions, refit, uses_base=True, no_encoder_decoder=_CALIBRATION),
    Pass("distill", "LoRA trained on the base to match the adapted source's answers (data, gradient steps)",
         DistillOptions, distill, uses_base=True, no_encoder_decoder=_CALIBRATION),
    Pass("fuse-hybrid", "a LoRA and bottleneck adapters into one; linear bottlenecks folded exactly",
         FuseHybridOptions, fuse_hybrid, several=True, uses_base=True, bottlenecks=True,
         roles=True),
    Pass("route", "several LoRA adapters routed per token (PEFT's Arrow): top_k by prototype, softmax",
         RouteOptions, route, several=True),
)  # fmt: skip


def pass_named(name: str) -> Pass:
    """The pass called `name`, or an error listing the known ones."""
    if name not in PASSES:
        raise BadInputError(f"unknown pass {name!r}", fix=f"choose one of: {', '.join(PASSES)}")
    return PASSES[name]


def parse_pass(text: str) -> tuple[Pass, object]:
    """A `NAME[:key=value,...]` spec as the pass and its parsed options."""
    name, _, options = text.partition(":")
    spec = pass_named(name.strip())
    return spec, parse_options(spec, options)
