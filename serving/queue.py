"""One model, one worker thread, a bounded queue in front of it; jobs can be cancelled between steps.

The pipeline is not thread-safe and one CPU/GPU gains nothing from running two denoising loops at
once, so every job runs on the same single worker thread. A job counts against the bound from
submission until the worker has really finished it (a timed-out or abandoned job still holds its
place until it stops at its next denoising step), so the bound is the true amount of queued work.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_pending` jobs; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy: {retry_after} s of queued work")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled (client gone, or timed out) before or while it ran."""


class Abandoned(Exception):
    """`InferenceQueue.run` gave up on a job: `reason` is "timeout" or "disconnected"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Job:
    """A unit of model work: `fn(job)` runs on the worker; it should call `job.step(i, n)` per step."""

    fn: Callable[[Job], Any] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued -> running -> done
    steps_done: int = 0
    steps_total: int = 0
    future: Future | None = None

    def step(self, done: int, total: int) -> None:
        """Record progress and stop the job here when it has been cancelled.

        Raises:
            Cancelled: the job's cancel event is set.
        """
        self.steps_done, self.steps_total = done, total
        if self.cancel.is_set():
            raise Cancelled("cancelled")


class InferenceQueue:
    """A single worker thread with at most `max_pending` jobs queued or running.

    Args:
        max_pending: the bound (>= 1); `submit` past it raises `QueueFull`.
    """

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="largen-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._durations: deque[float] = deque(maxlen=20)

    @property
    def pending(self) -> int:
        """Jobs queued or running now."""
        return self._pending

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queued work at the recent mean job time (at least 1)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * self._pending))

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        """Queue `fn` as a job.

        Raises:
            QueueFull: `max_pending` jobs are already queued or running.
        """
        job = Job(fn)
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(self.retry_after())
            self._pending += 1
        try:
            job.future = self._executor.submit(self._run, job)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        return job

    def _run(self, job: Job):
        start = time.perf_counter()
        try:
            if job.cancel.is_set():
                raise Cancelled("cancelled before it started")
            job.state = "running"
            return job.fn(job)
        finally:
            job.fn = None  # its closure holds the request's images; /v1/progress keeps the job a while
            job.state = "done"
            with self._lock:
                self._pending -= 1
                self._durations.append(time.perf_counter() - start)

    async def run(self, job: Job, timeout: float, disconnected: Callable[[], Any] | None = None, poll: float = 0.1):
        """Wait for `job`'s result; cancel it when `timeout` passes or `await disconnected()` turns true.

        Raises:
            Abandoned: timed out or the client went away (the job is cancelled).
            Whatever the job raised.
        """
        result = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Abandoned("timeout")
                done, _ = await asyncio.wait({result}, timeout=min(poll, left))
                if done:
                    return result.result()
                if disconnected is not None and await disconnected():
                    raise Abandoned("disconnected")
        except BaseException:
            # Also on asyncio cancellation (the server shutting down the request).
            job.cancel.set()
            raise

    def shutdown(self) -> None:
        """Stop taking work; queued jobs are cancelled, the running one stops at its next step."""
        self._executor.shutdown(wait=False, cancel_futures=True)
