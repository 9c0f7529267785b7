"""convert(): an adapter (PEFT directory or AIR file) re-exported as an AIR file or a PEFT directory."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from adaptrix.api.manifest import input_hashes, write_manifest
from adaptrix.artifacts import ADAPTRIX_VERSION
from adaptrix.frontends.air.adapter import AirAdapter
from adaptrix.frontends.formats import ReadAdapter, format_name, lower_adapter, read_adapter
from adaptrix.frontends.peft.config import CONFIG_NAME
from adaptrix.io.checkpoint import Checkpoint
from adaptrix.io.hashing import hash_files
from adaptrix.io.hub import is_hub_id, resolve_base
from adaptrix.io.output import atomic_file, atomic_output
from adaptrix.ir.errors import AdaptrixError, BadInputError
from adaptrix.targets.air import write_air_file
from adaptrix.targets.peft import write_peft

__all__ = ["CONVERT_FORMATS", "ConvertResult", "convert_adapter", "provenance"]

logger = logging.getLogger(__name__)

CONVERT_FORMATS = ("air", "peft")


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a convert produced."""

    out: Path
    to: str
    files: list[str]
    sites: int
    base: Path | None


def convert_adapter(
    adapter: Path | str, to: str, out: Path | str, *, base: Path | str | None = None, force: bool = False
) -> ConvertResult:
    """Re-export `adapter` as AIR (a file) or PEFT (a directory) at `out`, lowered onto `base` if given."""
    if to not in CONVERT_FORMATS:
        raise BadInputError(f"unknown format --to {to!r}", fix=f"choose one of: {', '.join(CONVERT_FORMATS)}")
    adapter, out = Path(adapter), Path(out)
    source = read_adapter(adapter)
    base_path = _base_for(source, None if base is None else Path(base), to)
    checkpoint = None if base_path is None else Checkpoint(base_path)
    ir = source.ir() if checkpoint is None else lower_adapter(source, checkpoint)
    groups = {"adapter": (adapter, source.files())}
    if checkpoint is not None:
        groups["base"] = (base_path, checkpoint.files())
    inputs = [path for root, files in groups.values() for path in (root, *files)]  # each as resolved
    try:
        if to == "air":
            with atomic_file(out, force=force, inputs=inputs) as tmp:
                write_air_file(ir, tmp, provenance(adapter, source, checkpoint))
            files = [out.name]
        else:
            with atomic_output(out, force=force, inputs=inputs) as tmp:
                files = write_peft(ir, checkpoint, tmp).files
                _write_peft_manifest(tmp, groups, files, len(ir.sites()))
    except AdaptrixError as exc:
        raise exc.with_context(f"--to {to}") from None
    logger.info("converted %s to %s at %s", adapter, to, out)
    return ConvertResult(out, to, files, len(ir.sites()), base_path)


def provenance(adapter: Path, source: ReadAdapter, base: Checkpoint | None) -> dict[str, object]:
    """Where an AIR file comes from: the input adapter and its files' sha256, the base, the version.

    Paths are recorded resolved (os.path.realpath), so the file does not depend on their spelling.
    """
    digests = hash_files(source.files())
    record: dict[str, object] = {
        "adaptrix_version": ADAPTRIX_VERSION,
        "adapter": os.path.realpath(adapter),
        "adapter_format": format_name(source),
        "adapter_files": {file.name: digest for file, digest in digests.items()},
        "base": None if base is None else os.path.realpath(base.path),
        "base_config_sha256": None if base is None else hash_files([base.path / "config.json"]).popitem()[1],
    }
    if isinstance(source, AirAdapter):
        record["origin"] = dict(source.provenance)
    return record


def _write_peft_manifest(out: Path, groups: dict, files: list[str], sites: int) -> None:
    """The PEFT folder's manifest.json: what it was made from (and what lets --force replace it)."""
    write_manifest(out, target="peft", dtype="float32", inputs=input_hashes(groups), passes=[],
                   files=files, extra={"sites": sites})  # fmt: skip


def _base_for(source: ReadAdapter, base: Path | None, to: str) -> Path | None:
    """The base to lower onto: --base, else a PEFT adapter's own local base, else none (AIR to AIR)."""
    if base is not None:
        return resolve_base(base)
    if isinstance(source, AirAdapter):
        if to == "peft":
            raise BadInputError(
                "--to peft from an AIR file needs --base",
                path=source.path,
                fix="pass --base BASE: the model whose module names the PEFT adapter is for",
            )
        return None
    config = json.loads((source.path / CONFIG_NAME).read_text())
    recorded = config.get("base_model_name_or_path", config.get("model_name"))  # PEFT's, AdapterHub's
    if isinstance(recorded, str) and recorded and (Path(recorded) / "config.json").is_file():
        logger.info("lowering onto %s, the base named in %s", recorded, CONFIG_NAME)
        return Path(recorded)
    if isinstance(recorded, str) and is_hub_id(recorded):
        return resolve_base(recorded)
    raise BadInputError(
        f"needs --base: its {CONFIG_NAME} names no local base directory ({recorded!r})",
        path=source.path,
        fix="pass --base BASE: the model the adapter was trained on",
    )
