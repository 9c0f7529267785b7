"""refit: carry a LoRA adapter to another base of its shape by refitting its A factors on data.

A delta scale * B @ A acts through its codes A x. On another base (the source trained further, a
fine-tuned variant) the module inputs x have moved, and the codes with them. refit keeps B and
the scale and solves, per op and in closed form (ridge regression, no training), for the A that
gives the base's inputs the codes the source's inputs gave on the same tokens:

    A_t = argmin ||X_t A_t^T - X_s A_s^T||^2 + lam ||A_t||^2,   lam = alpha * trace(X_t^T X_t) / d_in
        = ((X_t^T X_t + lam I)^-1 X_t^T X_s A_s^T)^T

X_s are the module's inputs in the source carrying the adapter, X_t those in the base carrying
the A's refit so far (layer by layer, in forward order, so each layer sees what the refit earlier
layers changed). The tokens: the user's prompts, continued greedily by the adapted source
(`generate` tokens), so that the positions where the adapter answers are covered. The rank and
the layout stay; only the base's dimensions are accepted (`project` changes those).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch

from adaptrix.artifacts import find_module
from adaptrix.calibration.inputs import STAGES, Capture, input_group
from adaptrix.calibration.models import add_pairs, load_auto
from adaptrix.calibration.prompts import calibration, read_prompts
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError
from adaptrix.ir.values import AdapterIR, LazyTensor, LowRank
from adaptrix.lowering.touched import TouchedModule, touched_modules
from adaptrix.passes.base import PassResult, rebuild
from adaptrix.passes.project import DIMENSIONS, source_base

__all__ = ["RefitOptions", "check_same_shape", "refit"]


@dataclass(frozen=True, slots=True)
class RefitOptions:
    """The options of refit.

    source: the directory of the base the adapter was made for. prompts: a file of prompts for the
    adapter's task (JSON token-id lists, or text lines for the base's tokenizer). generate: greedy
    tokens the adapted source adds to each prompt (decoders). alpha: the ridge's relative weight.
    """

    source: str = ""
    prompts: str = ""
    generate: int = 16
    alpha: float = 1e-3

    def __post_init__(self) -> None:
        """Both source and prompts are required; generate >= 0, alpha > 0."""
        if not self.source or not self.prompts:
            raise ValueError("options source=DIR (the adapter's own base) and prompts=FILE are required")
        if self.generate < 0:
            raise ValueError(f"option generate={self.generate} must be >= 0")
        if not self.alpha > 0:
            raise ValueError(f"option alpha={self.alpha} must be > 0")


def refit(ir: AdapterIR, options: RefitOptions, base: Checkpoint) -> PassResult:
    """Refit every LoRA op's A on the base (see the module docstring).

    Usage: `--pass refit:source=SRC_BASE,prompts=FILE[,generate=16,alpha=0.001]`. Report per
    site: `fit_error` (||X_t A_t^T - X_s A_s^T|| / ||X_s A_s^T|| over the calibration tokens) and
    `a_change` (||A_t - A_s|| / ||A_s||); the calibration's sequence and token counts.
    """
    check_same_shape(ir, base, "refit")
    source = source_base(options.source, ir.source)
    prompts = read_prompts(options.prompts, base.path, base.source.vocab_size)
    with torch.inference_mode(False), torch.no_grad():
        adapted = add_pairs(load_auto(source.path), ir, source)
        sequences = calibration(adapted, prompts, options.generate)
        codes = _source_codes(adapted, touched_modules(ir, source), sequences)
        del adapted
        model = load_auto(base.path)
        refitted, sites = {}, []
        for group in _stages(touched_modules(ir, base), base.source.num_layers):
            found = _refit_group(model, group, sequences, codes, options.alpha)
            refitted.update({key: a for key, (a, _) in found.items()})
            new_ir = _replace(ir, refitted, only={key for key in found})
            add_pairs(model, new_ir, base)  # the next layers see this layer's refit deltas
            sites += [entry for _, entry in found.values()]
    report = {
        "sequences": len(sequences),
        "tokens": sum(len(s) for s in sequences),
        "alpha": options.alpha,
        "sites": sites,
        "max_fit_error": max(entry["fit_error"] for entry in sites),
    }
    return PassResult(_replace(ir, refitted), True, report)


def check_same_shape(ir: AdapterIR, base: Checkpoint, name: str) -> None:
    """Pass `name` (refit, distill) takes LoRA on projections and heads, in the base's dimensions."""
    for field in (*DIMENSIONS, "num_layers"):
        if getattr(ir.source, field) != getattr(base.source, field):
            raise BadInputError(
                f"{name}: the adapter has {field}={getattr(ir.source, field)}, "
                f"the base {getattr(base.source, field)}",
                fix=f"carry it to the base's dimensions first (--pass project / redistribute before {name})",
            )
    for site, op in ir:
        if not isinstance(op, LowRank) or site.role not in STAGES:
            what = type(op).__name__ if not isinstance(op, LowRank) else f"LoRA on {site.role}"
            raise UnsupportedError(f"{site}: {name} carries LoRA on projections and heads, not {what}",
                                   fix=f"compile without --pass {name}, or drop those ops")  # fmt: skip


def _stages(modules: list[TouchedModule], layers: int) -> list[list[TouchedModule]]:
    """The touched modules grouped by what they read, in forward order."""
    groups: dict[tuple[int, int], list[TouchedModule]] = defaultdict(list)
    for module in modules:
        groups[input_group(module.placement, layers)].append(module)
    return [groups[key] for key in sorted(groups)]


def _ops(module: TouchedModule) -> list[LowRank]:
    return [op for ops in module.role_ops for op in ops]


def _modules(model: torch.nn.Module, group: list[TouchedModule]) -> dict[str, torch.nn.Module]:
    found = {}
    for module in group:
        target = find_module(model, module.placement.name)
        if target is None:
            raise BadInputError(f"refit: the loaded model has no module {module.placement.name}")
        found[module.placement.name] = target
    return found


def _source_codes(adapted: torch.nn.Module, modules: list[TouchedModule], sequences) -> dict[int, list]:
    """Per op (by id): its codes X_s A_s^T [tokens, rank] in the adapted source, batch by batch."""
    codes: dict[int, list[torch.Tensor]] = defaultdict(list)
    weights = {id(op): op.a.load().to(torch.float64) for module in modules for op in _ops(module)}

    def consume(inputs: dict[str, torch.Tensor]) -> None:
        for module in modules:
            for op in _ops(module):
                codes[id(op)].append(inputs[module.placement.name] @ weights[id(op)].T)

    Capture(_modules(adapted, modules)).run(adapted, sequences, consume)
    return codes


def _refit_group(model, group: list[TouchedModule], sequences, codes, alpha: float) -> dict[int, tuple]:
    """{op id: (new A, report entry)} for the ops of one stage."""
    gram: dict[str, torch.Tensor] = {}
    cross: dict[int, torch.Tensor] = defaultdict(lambda: 0)
    norms: dict[int, float] = defaultdict(float)
    batch = [0]

    def consume(inputs: dict[str, torch.Tensor]) -> None:
        for module in group:
            x = inputs[module.placement.name]
            gram[module.placement.name] = gram.get(module.placement.name, 0) + x.T @ x
            for op in _ops(module):
                c = codes[id(op)][batch[0]]
                cross[id(op)] = cross[id(op)] + x.T @ c
                norms[id(op)] += float(c.square().sum())
        batch[0] += 1

    Capture(_modules(model, group)).run(model, sequences, consume)
    found = {}
    for module in group:
        g = gram[module.placement.name]
        lam = alpha * float(torch.trace(g)) / g.shape[0]
        regular = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
        for site_role, op in zip(_roles(module), _ops(module), strict=True):
            a_t = torch.linalg.solve(regular, cross[id(op)])  # [in, rank]
            fit = float((a_t.T @ g @ a_t).trace() - 2 * (a_t * cross[id(op)]).sum()) + norms[id(op)]
            a_s = op.a.load().to(torch.float64)
            entry = {
                "site": site_role,
                "fit_error": max(fit, 0.0) ** 0.5 / max(norms[id(op)], 1e-300) ** 0.5,
                "a_change": float((a_t.T - a_s).norm() / a_s.norm().clamp_min(1e-30)),
            }
            found[id(op)] = (a_t.T.to(torch.float32).contiguous(), entry)
    return found


def _roles(module: TouchedModule) -> list[str]:
    placement = module.placement
    layer = "" if placement.layer is None else f"layer {placement.layer} "
    return [f"{layer}{role}" for role, ops in zip(placement.module.roles, module.role_ops, strict=True)
            for _ in ops]  # fmt: skip


def _replace(ir: AdapterIR, refitted: dict[int, torch.Tensor], only: set[int] | None = None) -> AdapterIR:
    """The IR with refit A's; with `only`, just those ops (the rest dropped)."""
    ops = []
    for site, op in ir:
        if only is not None and id(op) not in only:
            continue
        if id(op) in refitted:
            a = LazyTensor.of(refitted[id(op)], f"refit of {op.a.origin}")
            op = dataclasses.replace(op, a=a)
        ops.append((site, op))
    return rebuild(ir, ops)
