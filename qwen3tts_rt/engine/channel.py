"""A thread-safe output channel readable from threads and from asyncio.

The device worker puts messages; a gRPC handler awaits them (``aget``) and a CLI
blocks on them (``get``). The asyncio side never blocks its loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def drop(self, pred: Callable[[T], bool]) -> int:
        """Remove queued items matching ``pred`` (e.g. audio after a barge-in)."""
        with self._cond:
            kept = [x for x in self._items if not pred(x)]
            n = len(self._items) - len(kept)
            self._items = collections.deque(kept)
            return n

    def get(self, timeout: float | None = None) -> T:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise TimeoutError("no message within the timeout")
            return self._items.popleft()

    async def aget(self) -> T:
        while True:
            loop = asyncio.get_running_loop()
            with self._cond:
                if self._items:
                    return self._items.popleft()
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
