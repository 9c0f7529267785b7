"""Run parsed passes in order over one or several IRs, recording each for the manifest."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.bottleneck import refuse_bottlenecks
from adaptrix.ir.errors import AdaptrixError, BadInputError, UnsupportedError
from adaptrix.ir.route import refuse_routed
from adaptrix.ir.values import AdapterIR, refuse_module_roles
from adaptrix.passes import parse_pass

__all__ = ["run_passes"]

logger = logging.getLogger(__name__)


def run_passes(
    irs: Sequence[AdapterIR], specs: Sequence[str], base: Checkpoint | None = None
) -> tuple[list[AdapterIR], list[dict]]:
    """Apply `NAME[:k=v,...]` passes in order; a combining pass makes one IR of all of them.

    `base` is the model the result is compiled for; passes that carry an adapter to it
    (redistribute, project) read its dimensions and weights.
    """
    parsed = [parse_pass(text) for text in specs]  # every option is checked before any work
    irs, records = list(irs), []
    for spec, options in parsed:
        try:
            if spec.uses_base and base is None:
                raise BadInputError("needs the base the adapter is carried to", fix="give --base BASE")
            for ir in irs if not spec.bottlenecks else ():
                refuse_bottlenecks(ir, "only fuse-hybrid rewrites bottleneck adapters",
                                   fix="compile without --pass, or pass only the LoRA adapter")  # fmt: skip
            for ir in irs if spec.roles else ():
                refuse_module_roles(ir, "needs semantic roles (attn_q, mlp_down, ...)")
            for ir in irs if spec.no_encoder_decoder else ():
                _refuse_stacks(ir, base, spec.no_encoder_decoder)
            for ir in irs:
                refuse_routed(ir, "the adapters are already routed", fix="give --pass route last")
            extra = (base,) if spec.uses_base else ()
            if spec.several:
                if len(irs) < 2:
                    raise BadInputError("needs two adapters or more", fix="give several ADAPTER arguments")
                results = [spec.run(irs, options, *extra)]
            else:
                results = [spec.run(ir, options, *extra) for ir in irs]
        except AdaptrixError as exc:
            raise exc.with_context(f"pass {spec.name}") from None
        irs = [result.ir for result in results]
        report = results[0].report if len(results) == 1 else {"adapters": [r.report for r in results]}
        changed = any(result.changed for result in results)
        logger.info("pass %s: %s", spec.name, "changed the adapter" if changed else "changed nothing")
        records.append({"name": spec.name, "options": _plain(dataclasses.asdict(options)),
                        "changed": changed, "report": report})  # fmt: skip
    return irs, records


def _refuse_stacks(ir: AdapterIR, base: Checkpoint | None, why: str) -> None:
    """Refuse an encoder-decoder adapter or base: its layers are two stacks, not one depth."""
    for source in (ir.source, base.source if base is not None else None):
        if source is not None and (start := source.decoder_start) is not None:
            raise UnsupportedError(
                f"the {source.arch} model is an encoder-decoder (encoder layers 0-{start - 1}, "
                f"decoder layers {start}-{source.num_layers - 1}): {why}",
                fix="compile without this pass",
            )


def _plain(options: dict) -> dict:
    """Options as JSON values (tuples as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
