"""The runtimes `adaptrix parity` drives: PEFT for the reference, then one per backend."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptrix.api.manifest import read_artifact_manifest
from adaptrix.calibration.models import forward, load_auto
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.ir.errors import BadInputError, UnsupportedError

__all__ = ["BACKENDS", "arrow_outputs", "artifact_manifest", "reference_outputs", "run_backend"]

BACKENDS = ("merged", "hooks", "onnx-cpu", "onnx-cuda", "gguf")
_GGUF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # the others are quantized
# (what the backend returns, its dtype name, whether it is quantized, a note for the report)
Run = tuple[torch.Tensor, str, bool, str]


def reference_outputs(
    adapter: Path, base: Checkpoint, feeds: dict[str, torch.Tensor], scratch: Path
) -> tuple[torch.Tensor, str]:
    """PEFT's own forward (float32, unmerged) of the adapter on the base; AIR goes through PEFT.

    An AdapterHub adapter's reference is AdapterHub's own forward with the adapter active (its
    loader reads .bin weights with torch.load(weights_only=True) too).
    """
    from peft import PeftModel

    from adaptrix.frontends.adapterhub.adapter import HubAdapter
    from adaptrix.frontends.air.adapter import AirAdapter
    from adaptrix.frontends.formats import read_adapter

    read = read_adapter(adapter)
    if isinstance(read, HubAdapter):
        adapters = _adapterhub(adapter)
        model = load_auto(base.path)
        adapters.init(model)
        model.set_active_adapters(model.load_adapter(str(adapter), with_head=False))
        return forward(model.eval(), feeds), "adapterhub"
    if isinstance(read, AirAdapter):
        from adaptrix.api.convert import convert_adapter

        convert_adapter(adapter, "peft", scratch / "reference-peft", base=base.path)
        adapter = scratch / "reference-peft"
    model = PeftModel.from_pretrained(_reference_base(read, base), adapter, trust_remote_code=False).eval()
    return forward(model, feeds), "peft"


def arrow_outputs(manifest: dict, base: Checkpoint, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's Arrow model (create_arrow_model) over the adapters a routed artifact was compiled from."""
    from peft import ArrowConfig, create_arrow_model

    record, inputs = manifest["route"], manifest.get("inputs", {})
    labels = ["adapter", *(f"adapter.{i}" for i in range(2, len(record["adapters"]) + 1))]
    paths = [Path(str(inputs.get(label, {}).get("path"))) for label in labels]
    if missing := [path for path in paths if not path.is_dir()]:
        raise BadInputError(f"the routed artifact's adapter {missing[0]} is not on this machine",
                            fix="check parity where the adapters it was compiled from are")  # fmt: skip
    config = ArrowConfig(top_k=record["top_k"], router_temperature=record["temperature"], rng_seed=0)
    model = create_arrow_model(load_auto(base.path), [str(path) for path in paths], config)
    return forward(model.eval(), feeds)


def _adapterhub(adapter: Path):
    """AdapterHub's `adapters` library, the reference of an AdapterHub adapter; else a one-line refusal."""
    try:
        import adapters
    except ImportError:
        raise UnsupportedError(
            "AdapterHub's reference forward needs the `adapters` library, which is not installed",
            path=adapter,
            fix='pip install "adaptrix[adapterhub]" (it pins transformers 4.57); compile needs no extra',
        ) from None
    return adapters


def _reference_base(read, base: Checkpoint) -> torch.nn.Module:
    """The base as PEFT's reference loads it.

    A headless base under a classifier adapter becomes the sequence classifier the adapter was
    trained on (its head comes from the adapter).
    """
    from adaptrix.frontends.formats import lower_adapter
    from adaptrix.lowering.head import new_head_sites, task_labels

    ir = lower_adapter(read, base)
    sites = new_head_sites(ir, base)
    if not sites:
        return load_auto(base.path)
    import transformers

    kind = transformers.AutoModelForSequenceClassification
    labels = task_labels(ir, sites, base)
    return kind.from_pretrained(
        base.path, num_labels=labels, dtype=torch.float32, trust_remote_code=False
    ).eval()


def artifact_manifest(target: str, path: Path) -> dict:
    """The manifest of an artifact a compile for `target` wrote; else the command line is wrong (exit 2)."""
    fix = f"give a directory `adaptrix compile --target {target}` wrote"
    manifest = read_artifact_manifest(path, fix=fix)
    if manifest.get("target") != target:
        raise BadInputError(f"was compiled for {manifest.get('target')!r}, not {target}", path=path,
                            fix=f"pass it as {manifest.get('target')}=DIR")  # fmt: skip
    return manifest


def run_backend(target: str, path: Path, base: Checkpoint, feeds: dict[str, torch.Tensor]) -> Run:
    """Run one compiled artifact with its own runtime on the inputs."""
    manifest = artifact_manifest(target, path)
    dtype = str(manifest.get("dtype", "float32"))
    if target == "merged":
        return forward(load_auto(path, getattr(torch, dtype)), feeds), dtype, False, ""
    if target == "hooks":
        from adaptrix.runtimes.hooks import attach

        model = load_auto(base.path)
        with attach(model, path):
            return forward(model, feeds), dtype, False, "attached to the base loaded in float32"
    if target == "gguf":
        return _run_gguf(path, manifest, feeds)
    return _run_onnx(target, path, manifest, feeds)


def _run_gguf(path: Path, manifest: dict, feeds: dict[str, torch.Tensor]) -> Run:
    """llama.cpp's logits of each row (float32 KV cache); an unmerged artifact with its first adapter."""
    from adaptrix.runtimes.gguf import open_gguf

    if not bool(feeds["attention_mask"].all()):
        raise UnsupportedError("llama.cpp runs each row unpadded: the inputs' attention_mask has zeros",
                               fix="give inputs of one length without padding")  # fmt: skip
    model = open_gguf(path)
    names = model.adapter_names
    adapter = names[0] if names else None
    note = "" if adapter is None else f"unmerged (GGUF LoRA), {adapter} applied"
    quantize = str(model.section.get("quantize"))
    dtype = _GGUF_DTYPES.get(quantize, quantize)
    if quantize not in _GGUF_DTYPES:
        note = "; ".join(
            filter(None, [note, f"{quantize} quantized: reported, judged only with --tolerance"])
        )
    values = torch.from_numpy(model.logits(feeds["input_ids"].tolist(), adapter=adapter)).float()
    return values, dtype, quantize not in _GGUF_DTYPES, note


def _run_onnx(target: str, path: Path, manifest: dict, feeds: dict[str, torch.Tensor]) -> Run:
    from adaptrix.runtimes.onnx.seq2seq import SEQ2SEQ_TASK
    from adaptrix.runtimes.onnx.session import open_onnx

    artifact = open_onnx(path, provider="cuda" if target == "onnx-cuda" else "cpu")
    names, note = artifact.adapter_names, ""
    adapter = names[0] if names else None
    if len(names) > 1:
        note = f"unmerged with {len(names)} adapters: checked with {adapter} active"
    elif adapter:
        note = f"unmerged, {adapter} active"
    quantize = manifest.get("onnx", {}).get("quantize")
    if quantize:
        note = "; ".join(
            filter(None, [note, f"{quantize} quantized: reported, judged only with --tolerance"])
        )
    ids, mask = feeds["input_ids"].numpy(), feeds["attention_mask"].numpy()
    extra = {}
    if artifact.task == SEQ2SEQ_TASK:  # the decoder reads the ids too, as calibration's forward has it
        extra["decoder_input_ids"] = feeds.get("decoder_input_ids", feeds["input_ids"]).numpy()
    values = torch.from_numpy(artifact.logits(ids, mask, adapter=adapter, **extra)).float()
    return values, str(manifest.get("dtype", "float32")), bool(quantize), note
