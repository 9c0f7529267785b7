"""Where a base lies: a directory, or a hub id found in the local Hugging Face cache (never fetched).

`--base meta-llama/Llama-3.2-1B` is looked up with huggingface_hub offline (`local_files_only`);
with no `--base`, the adapter's `base_model_name_or_path` is used when it resolves locally.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from adaptrix.artifacts import PEFT_CONFIG_NAME
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["base_from_adapter", "is_hub_id", "resolve_base"]

logger = logging.getLogger(__name__)

# A hub id: `name` or `owner/name`, each part as the hub allows (bounded, no `..`).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_FIX = "download it once (hf download ID), or pass the model's directory as --base"


def resolve_base(base: Path | str | None, adapters: Sequence[Path | str] = ()) -> Path:
    """The base's directory: `base` as a path or a cached hub id; else the first adapter's base."""
    if base is None:
        return base_from_adapter(adapters)
    path = Path(base)
    if path.exists() or not is_hub_id(str(base)):
        return path
    return _cached(str(base), what="--base")


def base_from_adapter(adapters: Sequence[Path | str]) -> Path:
    """The base an adapter names (`base_model_name_or_path`), when it is a directory or cached."""
    config = Path(adapters[0]) / PEFT_CONFIG_NAME if adapters else None
    if config is None or not config.is_file():
        raise BadInputError("needs --base: the adapter names no base of its own",
                            path=Path(adapters[0]) if adapters else None, fix="give --base BASE")  # fmt: skip
    raw = read_json(config, what="adapter config")
    named = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not isinstance(named, str) or not named or len(named) > 4096:
        raise BadInputError("names no base_model_name_or_path", path=config, fix="give --base BASE")
    path = Path(named)
    if path.is_absolute() and path.is_dir():
        return path
    if not is_hub_id(named):
        raise BadInputError(f"names base {named[:200]!r}, which is neither a directory nor a hub id",
                            path=config, fix="give --base BASE")  # fmt: skip
    return _cached(named, what=f"{config}: base_model_name_or_path")


def is_hub_id(text: str) -> bool:
    """Whether a string has the form of a hub id (`owner/name` or `name`)."""
    return _HUB_ID.fullmatch(text) is not None and ".." not in text


def _cached(repo_id: str, what: str) -> Path:
    """The snapshot folder of `repo_id` in the local Hugging Face cache (offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError) as exc:
        logger.debug("%s: %s", repo_id, exc)
        raise BadInputError(f"{what} {repo_id!r} is no directory, and the local Hugging Face cache has no "
                            "snapshot of it", fix=_FIX) from None  # fmt: skip
    logger.info("base %s: the cached snapshot %s", repo_id, folder)
    return folder
