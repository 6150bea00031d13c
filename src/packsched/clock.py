"""The one clock the scheduler, the simulator and the benchmarks read time from.

Timestamps and sleeps come from the event loop's clock, anchored once to wall time. When the
loop's time is virtual (a test or benchmark loop that skips idle waits), every part of
packsched follows it, so hours of a trace replay in seconds.
"""

from __future__ import annotations

import asyncio
import time

import anyio

__all__ = ["Clock"]


class Clock:
    """Wall-clock timestamps and monotonic time derived from the running event loop."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None

    def monotonic(self) -> float:
        """Seconds on the event loop's clock (virtual if the loop's time is)."""
        try:
            # The asyncio loop's own clock, without anyio's backend lookup: this is read on
            # every state change.
            return asyncio.get_running_loop().time()
        except RuntimeError:  # another backend (trio)
            return anyio.current_time()

    def now(self) -> float:
        """Seconds since the epoch, advancing with the event loop's clock."""
        loop_now = self.monotonic()
        if self._anchor is None:
            self._anchor = (time.time(), loop_now)
        wall, loop = self._anchor
        return wall + (loop_now - loop)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the loop's clock."""
        await anyio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until `monotonic()` reaches `deadline`."""
        await anyio.sleep_until(deadline)
