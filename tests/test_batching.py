"""The batching executor: outcomes, errors, hung calls and shutdown."""

import asyncio
import threading

import pytest

from balloonctl.batching import DELIVER_CHUNK, BatchingExecutor, Call

pytestmark = pytest.mark.asyncio


async def test_calls_in_one_iteration_share_a_batch() -> None:
    executor = BatchingExecutor(2)
    threads: list[str] = []

    def record(value: int) -> int:
        threads.append(threading.current_thread().name)
        return value * 2

    calls = [executor.submit(lambda value=value: record(value)) for value in range(5)]
    results = [await call.future for call in calls]
    executor.shutdown()

    assert results == [0, 2, 4, 6, 8]
    assert len(set(threads)) == 1


async def test_error_reaches_the_caller() -> None:
    executor = BatchingExecutor(2)

    def fail() -> None:
        raise ValueError("bad value 7")

    call = executor.submit(fail)
    with pytest.raises(ValueError, match="bad value 7"):
        await call.future
    executor.shutdown()


async def test_hung_call_does_not_hold_its_batch() -> None:
    executor = BatchingExecutor(4, steal_after_s=0.01)
    release = threading.Event()

    def hang() -> str:
        release.wait(30)
        return "hung"

    first = executor.submit(lambda: "first")
    hung = executor.submit(hang)
    later = [executor.submit(lambda value=value: value) for value in range(3)]

    async with asyncio.timeout(10):
        assert await first.future == "first"
        assert [await call.future for call in later] == [0, 1, 2]
    assert not hung.future.done()
    assert executor.busy() == 1

    release.set()
    assert await hung.future == "hung"
    assert executor.busy() == 0
    executor.shutdown()


async def test_abandoned_wait_drops_the_outcome() -> None:
    # One thread, so the follow-up call runs only after the abandoned one.
    executor = BatchingExecutor(1)
    release = threading.Event()
    call = executor.submit(lambda: release.wait(30))

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await call.future
    release.set()
    follow_up = executor.submit(lambda: "next")

    assert await follow_up.future == "next"
    assert call.future.cancelled()
    assert call.finished
    executor.shutdown()


async def test_submit_after_shutdown_raises() -> None:
    executor = BatchingExecutor(1)
    executor.shutdown()

    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: None)


async def test_large_batch_completes_in_chunks() -> None:
    executor = BatchingExecutor(1)
    calls = [
        executor.submit(lambda value=value: value) for value in range(3 * DELIVER_CHUNK)
    ]

    assert await calls[0].future == 0
    not_done = [call for call in calls if not call.future.done()]
    results = [await call.future for call in calls]
    executor.shutdown()

    assert not_done
    assert results == list(range(3 * DELIVER_CHUNK))


async def test_small_batch_completes_before_large_one() -> None:
    # Finished calls are fed to the delivery step directly, in the order in
    # which the threads could have finished them: the large batch first.
    executor = BatchingExecutor(1)
    loop = asyncio.get_running_loop()
    large = [Call(lambda: None, loop.create_future()) for _ in range(2 * DELIVER_CHUNK)]
    small = Call(lambda: None, loop.create_future())
    for call in [*large, small]:
        call.finished = True
        call.outcome = "done"
    for call in large:
        call.large_batch = True

    executor._done.extend([*large, small])
    executor._deliver()

    assert small.future.done()
    assert sum(call.future.done() for call in large) == DELIVER_CHUNK
    await asyncio.sleep(0)
    assert all(call.future.done() for call in large)
    executor.shutdown()
