"""Blocking calls in worker threads, many calls to one thread hand-off.

Handing each call to a thread pool on its own costs more CPU than a libvirt
call on a local driver: a queue put and a thread wake-up on the way in, and
a wake-up of the event loop on the way back. Calls submitted in the same
iteration of the event loop (every domain task whose period ended at the
same time) are therefore handed to one worker thread as a batch, which
runs them one after another and wakes the loop once when it is done.

A call that hangs would hold up the rest of its batch. So a batch that has
not finished ``steal_after_s`` after it was handed over gives the calls it
has not started to another worker thread, and the results of the calls it
has finished are delivered at that point. A hung call then holds one
thread, as it would in a plain thread pool, and delays the other calls of
its batch by about ``steal_after_s``.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

STEAL_AFTER_S = 0.05
DELIVER_CHUNK = 50


class Call(Generic[T]):
    """One blocking call and its outcome; ``future`` completes on the loop."""

    __slots__ = (
        "error",
        "finished",
        "func",
        "future",
        "large_batch",
        "outcome",
        "started",
    )

    def __init__(self, func: Callable[[], T], future: "asyncio.Future[T]") -> None:
        # Dropped once run: its closure may hold libvirt handles, and a
        # libvirt connection stays open while any of its handles lives.
        self.func: Callable[[], T] | None = func
        self.future = future
        # Written by the worker thread, read on the loop thread.
        self.started = False
        self.finished = False
        self.outcome: Any = None
        self.error: BaseException | None = None
        self.large_batch = False


_Batch = collections.deque[Call[Any]]


class BatchingExecutor:
    """Run blocking calls in worker threads, batched per loop iteration."""

    def __init__(
        self,
        max_workers: int,
        *,
        thread_name_prefix: str = "",
        steal_after_s: float = STEAL_AFTER_S,
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=thread_name_prefix
        )
        self._steal_after_s = steal_after_s
        self._pending: _Batch = collections.deque()
        self._flush_scheduled = False
        self._done: list[Call[Any]] = []
        self._done_lock = threading.Lock()
        self._wake_scheduled = False
        # Finished calls whose futures are not completed yet, from batches
        # of at most DELIVER_CHUNK calls and from larger ones; loop thread only.
        self._ready_first: _Batch = collections.deque()
        self._ready: _Batch = collections.deque()
        self._chunk_scheduled = False
        # Calls whose outcome has not been delivered yet; loop thread only.
        self._undelivered: set[Call[Any]] = set()
        self._closed = False

    def submit(self, func: Callable[[], T]) -> Call[T]:
        """Queue ``func`` for a worker thread; must run on the event loop."""
        loop = asyncio.get_running_loop()
        call: Call[T] = Call(func, loop.create_future())
        if self._closed:
            raise RuntimeError("cannot submit a call after shutdown")
        self._pending.append(call)
        self._undelivered.add(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, loop)
        return call

    def busy(self) -> int:
        """Return how many calls are running in a worker thread now."""
        return sum(
            1 for call in self._undelivered if call.started and not call.finished
        )

    def shutdown(self) -> None:
        """Start no more calls; threads stuck in a call are not waited for."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, collections.deque()
        self._flush_scheduled = False
        self._hand_over(loop, batch)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        if len(batch) > DELIVER_CHUNK:
            for call in batch:
                call.large_batch = True
        try:
            self._pool.submit(self._run_batch, loop, batch)
        except RuntimeError as exc:  # the pool was shut down
            for call in batch:
                call.error = exc
                call.finished = True
            with self._done_lock:
                self._done.extend(batch)
            self._deliver()
            return
        loop.call_later(self._steal_after_s, self._watch, loop, batch)

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        # deque.popleft is atomic, so each call is taken either here or by
        # _watch on the loop thread, never by both.
        while not self._closed:
            try:
                call = batch.popleft()
            except IndexError:
                break
            func, call.func = call.func, None
            assert func is not None
            call.started = True
            try:
                call.outcome = func()
            except BaseException as exc:
                call.error = exc
            call.finished = True
            with self._done_lock:
                self._done.append(call)
        self._wake(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._done_lock:
            if not self._done or self._wake_scheduled:
                return
            self._wake_scheduled = True
        # A loop that is already closed has no one left to deliver to.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._wake_scheduled = False
        for call in done:
            queue = self._ready if call.large_batch else self._ready_first
            queue.append(call)
        self._deliver_chunk()

    def _deliver_chunk(self) -> None:
        """Complete the calls of small batches, then DELIVER_CHUNK of the rest.

        Completing a future makes its task runnable in the next loop
        iteration. In chunks, the tasks of a batch of a thousand calls (one
        period of every domain) run over several iterations, and lifecycle
        events that arrive meanwhile are handled between two chunks. Results
        of small batches (a new domain's first calls, a balloon target) go
        first, so they do not wait for the whole period's batch.
        """
        while self._ready_first:
            self._complete(self._ready_first.popleft())
        for _ in range(min(DELIVER_CHUNK, len(self._ready))):
            self._complete(self._ready.popleft())
        if self._ready and not self._chunk_scheduled:
            self._chunk_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_chunk)

    def _complete(self, call: Call[Any]) -> None:
        self._undelivered.discard(call)
        future = call.future
        outcome, error = call.outcome, call.error
        call.outcome = call.error = None
        # A caller that timed out or was cancelled no longer waits.
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def _next_chunk(self) -> None:
        self._chunk_scheduled = False
        self._deliver_chunk()

    def _watch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        """Deliver what a slow batch finished and move its unstarted calls."""
        self._deliver()
        stolen: _Batch = collections.deque()
        while True:
            try:
                stolen.append(batch.popleft())
            except IndexError:
                break
        if stolen and not self._closed:
            self._hand_over(loop, stolen)
