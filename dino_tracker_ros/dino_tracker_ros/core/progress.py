"""Progress reporting and cooperative cancellation for long jobs (CLI bars, action feedback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled

__all__ = ["CancelToken", "Progress", "ProgressCallback", "StageReporter"]


@dataclass(frozen=True)
class Progress:
    """One progress report.

    Attributes:
        stage: ``features``, ``flow``, ``masks``, ``best_buddies``, ``training``, ``caching``.
        fraction: progress of the whole job in [0, 1].
        step: step within the stage (the training iteration during ``training``).
        total: number of steps of the stage.
        loss: latest training loss (NaN outside training).
        rate: steps per second within the stage.
        message: optional human-readable detail.
    """

    stage: str
    fraction: float
    step: int = 0
    total: int = 0
    loss: float = float("nan")
    rate: float = 0.0
    message: str = ""

    @property
    def eta(self) -> float:
        """Seconds left in this stage at the current rate (``inf`` when unknown)."""
        if self.rate <= 0 or self.total <= 0:
            return float("inf")
        return max(self.total - self.step, 0) / self.rate


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """Thread-safe cancellation flag checked by long jobs between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("job cancelled on request")


class StageReporter:
    """Maps steps of one stage onto the whole job's [0, 1] range and measures the rate.

    Args:
        callback: where reports go (may be ``None``).
        stage: stage name.
        total: steps in the stage.
        start: fraction of the whole job where the stage begins.
        end: fraction of the whole job where the stage ends.
        cancel: checked at every :meth:`update`.
        min_interval: seconds between reports (the last step is always reported).
        initial: steps already done when the stage (re)starts, e.g. a resumed training
            run; the rate counts only the steps after it.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        stage: str,
        total: int,
        start: float = 0.0,
        end: float = 1.0,
        cancel: CancelToken | None = None,
        min_interval: float = 0.2,
        initial: int = 0,
    ) -> None:
        self.callback = callback
        self.stage = stage
        self.total = max(int(total), 1)
        self.start, self.end = start, end
        self.cancel = cancel
        self.min_interval = min_interval
        self._t0 = time.monotonic()
        self._last = -1e9
        self.initial = int(initial)

    def update(self, step: int, loss: float = float("nan"), message: str = "") -> None:
        """Report that ``step`` of ``total`` steps are done; raise if cancelled."""
        if self.cancel is not None:
            self.cancel.check()
        now = time.monotonic()
        if self.callback is None or (now - self._last < self.min_interval and step < self.total):
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        frac = self.start + (self.end - self.start) * min(step / self.total, 1.0)
        self.callback(
            Progress(self.stage, frac, step, self.total, loss,
                     max(step - self.initial, 0) / elapsed, message)
        )
