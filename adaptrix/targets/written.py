"""What a target reports after writing: its files and what it adds to manifest.json."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Written"]


@dataclass(frozen=True, slots=True)
class Written:
    """The files a target wrote (relative names) and its own section of the manifest.

    `digests`: sha256 of files the target hashed while writing them, so the manifest need not
    read them again.
    """

    files: list[str]
    manifest: dict = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
