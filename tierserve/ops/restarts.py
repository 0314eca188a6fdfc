"""When to restart a crashed process: exponential backoff, forgiven once it has stayed up a while.

A worker that crashes at once on every start (a bad config, a broken artifact) must not be
restarted in a tight loop; one that crashed once after hours deserves a quick restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# Up this long after a start, the process is taken as stable: its next crash restarts quickly again.
STABLE_AFTER_S = 60.0


@dataclass
class RestartBackoff:
    """Backoff of one process. `crashed(now)` says when to restart it; `started(now)` records a start."""

    initial_s: float = INITIAL_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    stable_after_s: float = STABLE_AFTER_S
    # When the process is down: the time it is due to start again.
    restart_at: float | None = None
    restarts: int = 0
    _delay_s: float = field(default=0.0, repr=False)
    _started_at: float | None = field(default=None, repr=False)

    def started(self, now: float) -> None:
        self._started_at = now
        self.restart_at = None

    def due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at

    def crashed(self, now: float) -> float:
        """The time at which to restart the process that just exited."""
        stable = self._started_at is not None and now - self._started_at >= self.stable_after_s
        self._delay_s = self.initial_s if stable or not self._delay_s else min(self._delay_s * 2, self.max_s)
        self.restart_at = now + self._delay_s
        return self.restart_at
