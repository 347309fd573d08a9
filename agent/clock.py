"""Time, injectable: everything paced in real time (the outbound track) or timestamped
(VAD decisions, latencies) reads a ``Clock``, so tests can drive it without sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t`` (at once if it already is)."""
        ...


class SystemClock:
    """``time.monotonic`` (the scale asyncio's loop uses)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
