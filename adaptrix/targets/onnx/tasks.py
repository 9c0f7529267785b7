"""Which optimum export task a base gets, and whether optimum can export its family at all.

The task follows the class the base's config names: a causal LM keeps its KV cache
(`text-generation-with-past`), an encoder-decoder's *ForConditionalGeneration is exported as
optimum's seq2seq graphs (`text2text-generation-with-past`: encoder, decoder, decoder with
past), a masked LM as `fill-mask`, a sequence classifier as `text-classification` and a bare
encoder as `feature-extraction`. A family optimum's exporter has no config for is refused
before anything is exported, with one line naming it.
"""

from __future__ import annotations

import logging

from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import UnsupportedError

__all__ = ["CAUSAL_TASK", "SEQ2SEQ_TASK", "check_exportable", "exported_tasks", "task_of"]

logger = logging.getLogger(__name__)

CAUSAL_TASK = "text-generation-with-past"
SEQ2SEQ_TASK = "text2text-generation-with-past"
_FIX = "use --target merged or --target hooks for this base"


def task_of(base: Checkpoint) -> str:
    """Optimum's export task for the base's architecture (decoders keep their KV cache)."""
    architectures = [str(a) for a in base.config.get("architectures") or []]
    encoder_decoder = bool(base.config.get("is_encoder_decoder"))
    for arch in architectures:
        if arch.endswith(("ForCausalLM", "LMHeadModel")) and not encoder_decoder:
            return CAUSAL_TASK
        if encoder_decoder and (arch.endswith("ForConditionalGeneration") or arch in _seq2seq_classes()):
            return SEQ2SEQ_TASK
        if arch.endswith("ForMaskedLM") and not encoder_decoder:
            return "fill-mask"
        if arch.endswith("ForSequenceClassification") and not encoder_decoder:
            return "text-classification"
        if arch.endswith("Model") and "For" not in arch and not encoder_decoder:
            return "feature-extraction"
    raise UnsupportedError(
        f"architectures {architectures} have no ONNX export task here",
        path=base.path / "config.json",
        fix="use a *ForCausalLM, *ForConditionalGeneration (encoder-decoder), *ForMaskedLM, "
        "*ForSequenceClassification or bare encoder base, or --target merged / hooks",
    )


def _seq2seq_classes() -> set[str]:
    """The seq2seq LM classes transformers' auto mapping names (MarianMTModel among them)."""
    from transformers.models.auto import modeling_auto

    names = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    return {cls for value in names.values() for cls in ([value] if isinstance(value, str) else value)}


def exported_tasks(model_type: str) -> frozenset[str] | None:
    """The tasks optimum's ONNX exporter has for a family, or None where it has no config for it.

    Raises ImportError where optimum's exporter is not installed.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the exporter's families)
    from optimum.exporters.tasks import TasksManager

    try:
        return frozenset(
            TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        )
    except KeyError:
        return None


def check_exportable(base: Checkpoint, task: str) -> None:
    """Refuse (one line) a family optimum's ONNX exporter has no config for, or not for `task`."""
    family = str(base.config.get("model_type"))
    tasks = exported_tasks(family)
    if tasks is None:
        raise UnsupportedError(
            f"optimum's ONNX exporter does not support the {family} family", path=base.path, fix=_FIX
        )
    if task not in tasks:
        raise UnsupportedError(
            f"optimum's ONNX exporter has no {task} export for the {family} family "
            f"(it has {', '.join(sorted(tasks))})",
            path=base.path,
            fix=_FIX,
        )
