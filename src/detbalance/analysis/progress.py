"""One progress display for ``compare`` and ``profile``: a rich bar on a terminal, plain log lines otherwise.

When stderr is not a terminal (a log file, CI, ``nohup``), a bar prints nothing useful, so progress comes
as one plain line at most every ``interval`` seconds: ``[compare] losses/focal seed 0: 350/3500 (10 %),
elapsed 2m05s, ETA 18m40s``.

The ETA comes from the recent rate (the last ``window`` updates), not the mean since the start: after a
pause (a suspended process, a machine busy with other jobs) it recovers within a few updates instead of
carrying the pause for the rest of the run. The rich bar's own estimate is likewise over its last 30 s.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress over a known (or unknown) total, as a context manager.

    Args:
        enabled: show anything at all.
        total: units of work (``None``: unknown).
        description: what is being done.
        stream: where to write (default ``sys.stderr``).
        plain: force plain log lines (default: when ``stream`` is not a terminal).
        interval: seconds between plain log lines.
        name: prefix of the plain lines.
        window: updates over which the ETA's rate is measured.
    """

    def __init__(
        self,
        enabled: bool,
        *,
        total: int | None,
        description: str = "",
        stream: TextIO | None = None,
        plain: bool | None = None,
        interval: float = 30.0,
        name: str = "detbalance",
        window: int = 20,
    ) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self.stream = stream if stream is not None else sys.stderr
        self.plain = plain if plain is not None else not getattr(self.stream, "isatty", lambda: False)()
        self.interval, self.name = interval, name
        self.completed = 0
        self._rich: Any = None
        self._t0 = self._last = time.perf_counter()
        self._base = 0  # completed units when the rate's clock started (resumed work is not timed)
        self._recent: deque[tuple[float, int]] = deque([(self._t0, 0)], maxlen=max(2, window + 1))

    def __enter__(self) -> Progress:
        if self.enabled and not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        elif self.enabled:
            self._line(force=True)  # say at once that work started
        return self

    def stage(self, description: str, *, total: int | None) -> None:
        """Start a new stage (``profile``'s steps): a new description and total, the count back at 0."""
        self.description, self.total, self.completed = description, total, 0
        self._t0, self._base = time.perf_counter(), 0
        self._recent.clear()
        self._recent.append((self._t0, 0))
        if self._rich is not None:
            self._rich.update(self._task, description=description, total=total, completed=0)
        elif self.enabled:
            self._line(force=True)

    def describe(self, description: str) -> None:
        self.description = description
        if self._rich is not None:
            self._rich.update(self._task, description=description)

    def advance(self, n: int = 1) -> None:
        self.set_completed(self.completed + n)

    def set_completed(self, n: int, *, skipped: bool = False) -> None:
        """Set the units done; ``skipped`` marks work reused from disk (kept out of the ETA's rate)."""
        now = time.perf_counter()
        if skipped:
            self._base += n - self.completed
            self._recent.clear()  # reused work took no time: the rate restarts from here
        self.completed = n
        self._recent.append((now, n))
        if self._rich is not None:
            self._rich.update(self._task, completed=n)
        elif self.enabled:
            self._line()

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.perf_counter() - self._t0
        text = f"[{self.name}] {self.description}: {self.completed}"
        if self.total:
            text += f"/{self.total} ({100 * self.completed / self.total:.0f} %)"
        text += f", elapsed {_clock(elapsed)}"
        rate = self.rate()
        if self.total and rate is not None and rate > 0:
            text += f", ETA {_clock((self.total - self.completed) / rate)}"
        return text

    def rate(self) -> float | None:
        """Units per second over the last ``window`` updates (``None`` before two timed updates)."""
        if len(self._recent) < 2:
            return None
        (t_first, n_first), (t_last, n_last) = self._recent[0], self._recent[-1]
        return (n_last - n_first) / (t_last - t_first) if t_last > t_first else None

    def _line(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and self.plain:
            self._line(force=True)
