"""Progress bars for the offline evaluation's long phases, on stderr so that `--json` stdout stays clean."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBars:
    """A rich progress bar per phase, or nothing when not `enabled`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None

    def __enter__(self) -> ProgressBars:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A function that advances the new bar by n."""
        progress = self._progress
        if progress is None:
            return lambda n: None
        task_id = progress.add_task(description, total=total)
        return lambda n: progress.advance(task_id, n)
