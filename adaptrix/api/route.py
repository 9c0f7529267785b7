"""Request-level routing: which one of several adapters serves a prompt, for engines that serve one.

`route(artifact, input_ids)` scores every adapter over the prompt's tokens with the per-module
prototypes of PEFT's Arrow (the top right singular vector of each adapter's B A): the base runs
on the prompt, each routed module's input x is scored as Arrow scores it per token (softmax of
the top_k |x @ prototypes.T| over the temperature), and the adapter with the largest mean
coefficient over the tokens and modules wins. It reads a routed hooks bundle or routed ONNX
artifact (`--pass route`: their stored prototypes and options), or an unmerged ONNX artifact's
`.onnx_adapter` files (prototypes computed from their LoRA pairs; top_k 1, temperature 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptrix.api.manifest import read_artifact_manifest
from adaptrix.artifacts import ROUTE_TENSORS
from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import LazyTensor, LowRank
from adaptrix.passes.route import prototype, prototype_overlap
from adaptrix.runtimes.hooks.route import arrow_coefficients

__all__ = [
    "Router",
    "base_model",
    "module_inputs",
    "read_router",
    "request_scores",
    "route",
    "route_overview",
    "route_scores",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Router:
    """An artifact's adapters, each routed module's prototypes [adapters, in], and the options."""

    adapters: tuple[str, ...]
    prototypes: Mapping[str, torch.Tensor]  # module (checkpoint name) -> [adapters, in]
    top_k: int
    temperature: float
    base: Path | None  # the base the artifact was compiled from, as its manifest records it


def route(
    artifact: Path | str | Sequence[Path | str] | Router,
    input_ids: Sequence[int] | torch.Tensor,
    model: torch.nn.Module | None = None,
) -> str:
    """The name of the adapter that best fits the prompt `input_ids` (one prompt: [tokens] or [1, tokens]).

    `artifact`: a routed artifact, an unmerged ONNX artifact, or a list of hooks bundles of one adapter
    each (named by their directories), or a calibrated router (adaptrix.calibrate_route). `model`:
    the plain base as a transformers model (no bundle attached); None loads the base the manifest names.
    """
    if callable(getattr(artifact, "pick", None)):  # a calibrated router: Centroids (route_centroids)
        return artifact.pick(input_ids, model)
    router = artifact if isinstance(artifact, Router) else read_router(artifact)
    scores = route_scores(router, input_ids, model)
    return router.adapters[int(scores.argmax())]


def route_scores(
    router: Router, input_ids: Sequence[int] | torch.Tensor, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """Each adapter's mean Arrow coefficient over the prompt's tokens and the routed modules, [adapters]."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise BadInputError(f"route takes one prompt of token ids, found shape {list(ids.shape)}",
                            fix="route each prompt on its own")  # fmt: skip
    if model is None:
        model = base_model(router)
    inputs = module_inputs(model, list(router.prototypes), ids)
    return request_scores(router, inputs)


def request_scores(router: Router, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean over modules of the mean over tokens of Arrow's coefficients, [adapters]; the scoring rule."""
    total = torch.zeros(len(router.adapters), dtype=torch.float64)
    for name, tokens in inputs.items():
        protos = router.prototypes[name].to(torch.float32)
        coeff = arrow_coefficients(tokens.to(torch.float32), protos, router.top_k, router.temperature)
        total += coeff.double().mean(0)
    return total / max(len(inputs), 1)


@torch.no_grad()
def module_inputs(model: torch.nn.Module, names: Sequence[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's input over one forward of `model` on `ids`, as [tokens, in] float32."""
    from adaptrix.artifacts import find_module

    modules = dict(model.named_modules())
    found, removers = {}, []

    def capture(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            found[name] = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)

        return hook

    for name in names:
        module = find_module(model, name, modules)
        if module is None:
            raise BadInputError(f"the model has no module {name!r}",
                                fix="pass the base the artifact was compiled for")  # fmt: skip
        removers.append(module.register_forward_pre_hook(capture(name), with_kwargs=True))
    try:
        device = next(model.parameters()).device
        model(input_ids=ids.to(device))
    finally:
        for remover in removers:
            remover.remove()
    return found


def read_router(artifact: Path | str | Sequence[Path | str]) -> Router:
    """The router of a routed hooks bundle or ONNX artifact, an unmerged ONNX artifact, or hooks bundles."""
    if not isinstance(artifact, str | Path):
        return _bundles_router([Path(path) for path in artifact])
    root = Path(artifact)
    manifest = read_artifact_manifest(root, fix="compile one with --pass route, or with --unmerged for ONNX")
    base = _manifest_base(manifest)
    if isinstance(manifest.get("bundle"), dict):
        return _bundle_router(root, base)
    section = manifest.get("onnx") if isinstance(manifest.get("onnx"), dict) else {}
    if isinstance(manifest.get("route"), dict) and (root / ROUTE_TENSORS).is_file():
        return _stored_router(root, manifest["route"], base)
    if isinstance(section.get("lora"), dict):
        return _onnx_adapters_router(root, section["lora"], base)
    raise BadInputError("holds no routing and no swappable adapters", path=root,
                        fix="compile the adapters with --pass route, or to ONNX with --unmerged")  # fmt: skip


def _bundle_router(root: Path, base: Path | None) -> Router:
    """A routed hooks bundle's prototypes and options (format 4)."""
    from adaptrix.runtimes.hooks.bundle import load_bundle

    bundle = load_bundle(root)
    routed = [entry for entry in bundle.modules if entry.route]
    if not routed:
        raise BadInputError("is a hooks bundle of one adapter: nothing to route between", path=root,
                            fix="compile several adapters with --pass route")  # fmt: skip
    first = routed[0].route
    protos = {entry.name: bundle.tensors[entry.route["prototypes"]].to(torch.float32) for entry in routed}
    return Router(tuple(first["adapters"]), protos, first["top_k"], float(first["temperature"]), base)


def _bundles_router(paths: list[Path]) -> Router:
    """Prototypes from hooks bundles of one adapter each (their LoRA pairs, modules all of them adapt)."""
    from adaptrix.runtimes.hooks.bundle import load_bundle

    if len(paths) < 2 or len({path.name for path in paths}) != len(paths):
        raise BadInputError("route takes two hooks bundles or more, in directories of different names",
                            fix="give each adapter's bundle, or one compiled with --pass route")  # fmt: skip
    pairs: dict[str, dict[str, LowRank]] = {}
    base = None
    for path in paths:
        bundle = load_bundle(path)
        base = base or _manifest_base(bundle.manifest)
        for entry in bundle.modules:
            if entry.lora and entry.layout in ("linear", "conv1d"):
                down, up = (bundle.tensors[entry.lora[key]] for key in ("down", "up"))
                pairs.setdefault(entry.name, {})[path.name] = _pair(down, up, entry.name)
    return _pairs_router(tuple(path.name for path in paths), pairs, paths[0], base)


def _stored_router(root: Path, record: dict, base: Path | None) -> Router:
    """A routed ONNX artifact's prototypes (route.safetensors) and the manifest's options."""
    from safetensors.torch import load_file

    protos = load_file(str(root / ROUTE_TENSORS))
    return Router(tuple(record["adapters"]), protos, int(record["top_k"]), float(record["temperature"]), base)


def _onnx_adapters_router(root: Path, lora: dict, base: Path | None) -> Router:
    """Prototypes from an unmerged ONNX artifact's .onnx_adapter files (modules all of them adapt)."""
    import onnxruntime as ort

    adapters = lora.get("adapters")
    if not isinstance(adapters, dict) or len(adapters) < 2:
        raise BadInputError("has fewer than two adapters to route between", path=root,
                            fix="compile several adapters with --unmerged")  # fmt: skip
    pairs: dict[str, dict[str, LowRank]] = {}
    for name, entry in sorted(adapters.items()):
        params = ort.AdapterFormat.read_adapter(str(root / entry["file"])).get_parameters()
        values = {key: torch.from_numpy(value.numpy().astype("float32")) for key, value in params.items()}
        for key, down in values.items():
            module = key.removesuffix(".lora_A")
            if key.endswith(".lora_A") and f"{module}.lora_B" in values:
                pairs.setdefault(module, {})[name] = _pair(down, values[f"{module}.lora_B"], key)
    return _pairs_router(tuple(sorted(adapters)), pairs, root, base)


def _pairs_router(names: tuple[str, ...], pairs: dict[str, dict[str, LowRank]], where: Path, base) -> Router:
    """A router of top_k 1 from each module's LoRA pair per adapter (modules every adapter has)."""
    shared = {module: found for module, found in pairs.items() if len(found) == len(names)}
    if not shared:
        raise BadInputError("has no module that every adapter adapts", path=where,
                            fix="route adapters of the same target modules")  # fmt: skip
    protos = {
        module: torch.stack([prototype([found[n]]) for n in names]).float()
        for module, found in shared.items()
    }
    return Router(names, protos, 1, 1.0, base)


def _pair(down: torch.Tensor, up: torch.Tensor, origin: str) -> LowRank:
    """A module's pair as stored at serving time (down [in, r], up [r, out]) as an IR LowRank."""
    a = LazyTensor.of(down.float().T.contiguous(), f"{origin} down")
    return LowRank(a, LazyTensor.of(up.float().T.contiguous(), f"{origin} up"), 1.0)


def _manifest_base(manifest: object) -> Path | None:
    """The base path a manifest records among its inputs."""
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    record = inputs.get("base") if isinstance(inputs, dict) else None
    path = record.get("path") if isinstance(record, dict) else None
    return Path(path) if isinstance(path, str) else None


def base_model(router: Router) -> torch.nn.Module:
    """The base the artifact's manifest names, loaded with transformers."""
    from adaptrix.calibration.models import load_auto

    if router.base is None or not (router.base / "config.json").is_file():
        raise BadInputError(f"the artifact's base {router.base} is not on this machine",
                            fix="pass the base model: route(artifact, ids, model=...)")  # fmt: skip
    logger.info("loading the base %s to route", router.base)
    return load_auto(router.base)


def route_overview(path: Path | str, manifest: dict) -> dict | None:
    """What `inspect` shows of an artifact's routing: adapters, options, mean |cos| of prototypes per pair.

    None for an artifact that neither routes nor holds two swappable adapters or more.
    """
    lora = (manifest.get("onnx") or {}).get("lora") if isinstance(manifest.get("onnx"), dict) else None
    adapters = lora.get("adapters") if isinstance(lora, dict) else None
    if not isinstance(manifest.get("route"), dict) and not (isinstance(adapters, dict) and len(adapters) > 1):
        return None
    router = read_router(path)
    overlaps = [prototype_overlap(protos) for protos in router.prototypes.values()]
    mean = torch.stack(overlaps).mean(0)
    names = router.adapters
    pairs = {f"{names[i]}|{names[j]}": round(float(mean[i, j]), 6)
             for i in range(len(names)) for j in range(i + 1, len(names))}  # fmt: skip
    return {"adapters": list(names), "top_k": router.top_k, "temperature": router.temperature,
            "modules": len(overlaps), "overlap": pairs}  # fmt: skip
