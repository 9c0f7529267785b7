"""What optimum's exporter is asked to write for a base, beyond the task: library and outputs.

- Always the plain transformers export (`library_name="transformers"`): optimum reads a
  sentence-transformers folder (modules.json, config_sentence_transformers.json) as a
  sentence-transformers model and exports `token_embeddings` / `sentence_embedding`, which
  optimum's own ORTModelForFeatureExtraction cannot load. The transformers export has the
  `last_hidden_state` it reads; the pooling modules stay with the model's side files.
- A feature-extraction base with a pooler (BertModel, RobertaModel) also exports
  `pooler_output`: optimum's feature-extraction config leaves it out, so the pooler is not in the
  graph, and an adapter that touches it (PEFT's `target_modules=["query", "value", "dense"]`
  adapts `pooler.dense` too) would have nowhere to go. The extra output costs one small matmul.
"""

from __future__ import annotations

from adaptrix.io.checkpoint import Checkpoint

__all__ = ["POOLER_OUTPUT", "export_kwargs", "has_pooler"]

POOLER_OUTPUT = "pooler_output"
_POOLER_WEIGHT = "pooler.dense.weight"


def has_pooler(base: Checkpoint) -> bool:
    """Whether the base's checkpoint holds a pooler (BertModel / RobertaModel with add_pooling_layer)."""
    return any(name == _POOLER_WEIGHT or name.endswith(f".{_POOLER_WEIGHT}") for name in base.tensors)


def export_kwargs(base: Checkpoint, task: str) -> dict:
    """Extra keyword arguments of optimum's main_export for `base` exported for `task`."""
    kwargs: dict = {"library_name": "transformers"}
    if task == "feature-extraction" and has_pooler(base):
        kwargs["custom_onnx_configs"] = {"model": _with_pooler_output(base)}
    return kwargs


def _with_pooler_output(base: Checkpoint):
    """The feature-extraction export config of the base, with `pooler_output` added to its outputs."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path, trust_remote_code=False, local_files_only=True)
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=config.model_type, task="feature-extraction", library_name="transformers"
    )
    plain = constructor(config)

    class WithPoolerOutput(type(plain)):
        """The same export config, writing the pooler's output after the last hidden state."""

        @property
        def outputs(self) -> dict:
            """The task's outputs, then the pooler's [batch, hidden] output."""
            return {**super().outputs, POOLER_OUTPUT: {0: "batch_size"}}

    return WithPoolerOutput(config, task="feature-extraction")
