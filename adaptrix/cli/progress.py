"""compile's progress on stderr: a label for each phase, and a byte count where the phase has one."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

__all__ = ["CompileProgress"]


class CompileProgress:
    """What compile reports on stderr, only on a terminal: the phase, and bytes where it counts them."""

    def __init__(self, console: Console, enabled: bool):
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._bar = None
        self._task = None
        self._done = 0

    def __enter__(self) -> CompileProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(), "{task.description}", BarColumn(), _bytes_column(),
                                 TimeElapsedColumn(), console=self.console, transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("compiling", total=None)
        return self

    @property
    def advance(self) -> Callable[[int, int], None] | None:
        """`advance(step, total)`: `step` more bytes of `total` done (None when not shown)."""
        return self._advance if self._bar is not None else None

    @property
    def phase(self) -> Callable[[str], None] | None:
        """`phase(label)`: a new phase began (None when not shown)."""
        return self._phase if self._bar is not None else None

    def _advance(self, step: int, total: int) -> None:
        self._done += step
        self._bar.update(self._task, completed=self._done, total=total)

    def _phase(self, label: str) -> None:
        self._done = 0
        self._bar.remove_task(self._task)  # a fresh task: no byte total or time carried over
        self._task = self._bar.add_task(label, total=None)
        self._bar.refresh()  # shown at once: a phase may be long before it counts a byte

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _bytes_column():
    """A byte count that shows nothing while the total is unknown (no `0/? bytes`)."""
    from rich.progress import DownloadColumn
    from rich.text import Text

    class BytesColumn(DownloadColumn):
        def render(self, task) -> Text:
            return Text("") if task.total is None else super().render(task)

    return BytesColumn()
