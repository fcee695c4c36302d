"""A CancelledError that a library raises on its own (grpc.aio did, under a partition in
`pacsnode sim chaos --scenario partition --seed 5`) is not the caller's cancellation:
background loops must tell the two apart, or a hint replay loop ends silently for ever."""

from __future__ import annotations

import asyncio

from pacsnode.replication.transport import cancelled_by_caller


def test_a_stray_cancelled_error_is_not_the_callers_cancellation() -> None:
    async def library_call() -> None:
        raise asyncio.CancelledError()  # Raised inside, nobody cancelled our task.

    async def caller() -> bool:
        try:
            await library_call()
        except asyncio.CancelledError:
            return cancelled_by_caller()
        return True

    assert asyncio.run(caller()) is False


def test_a_real_cancellation_is_seen() -> None:
    seen: list[bool] = []

    async def victim() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(cancelled_by_caller())
            raise

    async def main() -> None:
        task = asyncio.ensure_future(victim())
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert seen == [True]
