"""The development server's admission limit: a bounded number of Predict calls running and waiting.

TF-Serving bounds its work with a batching queue; the development server bounds it with
:class:`Admission`, so memory stays bounded under any load and an overloaded server answers
RESOURCE_EXHAUSTED with a retry hint (``retry after ... s`` and the trailing metadata
``retry-after-ms``) that clients back off by.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from tf_agg3d.serving.errors import RpcError


class Admission:
    """At most `max_running` Predict calls run and `max_queued` wait; the rest are refused.

    A refused call gets RESOURCE_EXHAUSTED with a retry hint: the recent mean call time times
    the calls ahead of it per running slot (0.05..30 s). Counters are kept for tests and
    benchmarks (:meth:`stats`).
    """

    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError(
                f"max_concurrent_requests >= 1 and max_queued_requests >= 0 expected, got "
                f"{max_running} and {max_queued}"
            )
        self.max_running = int(max_running)
        self.max_queued = int(max_queued)
        self._cond = threading.Condition()
        self.running = self.queued = 0
        self.peak_running = self.peak_queued = 0
        self.admitted = self.rejected = 0
        self._mean_s = 0.5  # call time, exponentially averaged

    def retry_after_s(self) -> float:
        ahead = self.running + self.queued + 1
        return min(30.0, max(0.05, self._mean_s * ahead / self.max_running))

    @contextlib.contextmanager
    def admit(self, is_active: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Runs the block in a slot; RpcError RESOURCE_EXHAUSTED when the queue is full."""
        with self._cond:
            if self.running >= self.max_running and self.queued >= self.max_queued:
                self.rejected += 1
                wait = self.retry_after_s()
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server overloaded: {self.running} Predict calls running and "
                    f"{self.queued} queued (max_concurrent_requests={self.max_running}, "
                    f"max_queued_requests={self.max_queued}); retry after {wait:.2f} s",
                    retry_after_s=wait,
                )
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            try:
                while self.running >= self.max_running:
                    self._cond.wait(timeout=0.25)
                    if not is_active():  # the client gave up (deadline, cancel) while queued
                        raise RpcError(grpc.StatusCode.CANCELLED, "the call ended while queued")
            finally:
                self.queued -= 1
            self.running += 1
            self.admitted += 1
            self.peak_running = max(self.peak_running, self.running)
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - start)
                self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": self.running,
                "queued": self.queued,
                "peak_running": self.peak_running,
                "peak_queued": self.peak_queued,
                "admitted": self.admitted,
                "rejected": self.rejected,
            }
