"""Errors a user can act on: what is wrong, where, and what to do."""

from __future__ import annotations

__all__ = ["AdaptrixError", "BadInputError", "ParityError", "UnsupportedError", "site_context"]


class AdaptrixError(Exception):
    """A failure explained in one line; the CLI prints it and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        """The whole error on one line: `PATH: what is wrong; fix`."""
        text = " ".join(self.message.split())
        if self.path:
            text = f"{self.path}: {text}"
        if self.fix:
            text = f"{text}; {' '.join(self.fix.split())}"
        return text

    def with_context(self, context: str) -> AdaptrixError:
        """The same error with a stage or site prefixed to its message."""
        return type(self)(f"{context}: {self.message}", path=self.path, fix=self.fix)


class BadInputError(AdaptrixError):
    """An input file or option is malformed, inconsistent or missing."""


class UnsupportedError(AdaptrixError):
    """A well-formed input uses a feature Adaptrix cannot honour exactly."""


class ParityError(AdaptrixError):
    """An artifact's outputs differ from the reference beyond tolerance."""

    exit_code = 1


class site_context:  # noqa: N801 - a context manager used like a function
    """Re-raise an AdaptrixError inside the block with the site prefixed to its message."""

    def __init__(self, site: object):
        self.site = site

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, AdaptrixError):
            raise exc.with_context(str(self.site)) from None
