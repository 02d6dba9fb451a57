"""Failed token attempts per client: guessing tokens gets slow, then 429 with ``Retry-After``.

Only failures count (a wrong or unknown token), so a client with a good token
never notices the limiter unless it also sends bad ones. One limiter lives on
``app.state``; its memory is bounded by forgetting the oldest clients first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class FailedAuthLimiter:
    """At most ``max_failures`` failed attempts per client within a sliding ``window_s``."""

    def __init__(
        self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client) or deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None if it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def record_failure(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
