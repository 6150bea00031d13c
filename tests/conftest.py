"""Shared test helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

T = TypeVar("T")


async def hosted(cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave `cm` in one task of its own, for use in async generator fixtures.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, while a task group
    (and so a running Scheduler) must be left in the task that entered it.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    leave = asyncio.Event()

    async def host() -> None:
        try:
            async with cm as value:
                entered.set_result(value)
                await leave.wait()
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            raise

    task = asyncio.ensure_future(host())
    try:
        yield await entered
    finally:
        leave.set()
        await task
