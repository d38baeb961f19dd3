"""Cross-request dynamic batching: concurrent `convert` calls merged into one engine batch.

    batcher = Batcher(converter, max_batch=64, max_wait_ms=5)
    y = batcher.convert(image, n=4, seed=7)             # from any thread; == converter.convert(image, 4, seed=7)
    y = await batcher.convert_async(image, n=4, seed=7)  # from asyncio

Batching is configuration, as in Ray Serve's `@serve.batch` and Triton's dynamic batcher
(docs/serving.md): `convert_merged` takes a list of requests and returns a list of answers and
knows nothing of queues; `BatchQueue` owns the queue, the max batch (in engine rows), the
max wait and the deadlines, and knows nothing of the model.

Noise is per request, never per merged batch: each request draws its B * n latents from its
own seed's stream exactly as a lone `Converter.convert` call does, so a request's answer does
not depend on who it was batched with.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .converter import Converter
from .errors import InputError, OverloadedError, RequestTimeoutError
from .inputs import DEFAULT_TEMPERATURE, positive_int, preprocess_batch, seed_value, temperature_value


@dataclass(frozen=True)
class ConvertRequest:
    """One `convert` call, preprocessed: conditions (B, 1, S, S) float32 in {0, 1}."""

    conditions: np.ndarray
    n: int
    seed: int | None
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def rows(self) -> int:
        """Engine rows this request needs: one per sample."""
        return self.conditions.shape[0] * self.n


def make_request(converter: Converter, images: Any, n: int, seed: int | None = None,
                 temperature: float = DEFAULT_TEMPERATURE) -> ConvertRequest:
    """Check the arguments as `Converter.convert` does and preprocess the images (in the
    caller's thread: a bad image fails its own call, never the batch it would have joined)."""
    n = positive_int(n, "n")
    seed, temperature = seed_value(seed), temperature_value(temperature)
    converter._check_output("convert", 1, n)  # the same max_output_bytes refusal as a lone call
    conditions = preprocess_batch(images, "images")  # (B, 1, S, S)
    converter._check_output("convert", conditions.shape[0], n)
    return ConvertRequest(conditions, n, seed, temperature)


def _host(latents) -> np.ndarray:
    """Latents from a device stream (CuPy) come to the host: the merged batch is assembled there."""
    return latents if isinstance(latents, np.ndarray) else latents.get()


def convert_merged(converter: Converter, requests: Sequence[ConvertRequest]) -> list[np.ndarray]:
    """Requests -> their answers, (B, n, S, S) each, through as few engine calls as max_batch allows.

    Each request's latents are drawn the way `Backend.convert` draws them for a lone call (one
    sampler per call, all B * n drawn before any chunk runs), then the requests' latents and
    conditions are concatenated and cut into engine batches of converter.max_batch rows.
    """
    backend, size = converter.backend, converter.image_size
    latents, conditions = [], []
    for request in requests:
        sampler = backend.latent_sampler(request.seed)
        latents.append(_host(sampler.draw(request.rows, converter.latent_dim, request.temperature)))  # (B * n, D)
        conditions.append(np.repeat(request.conditions, request.n, axis=0))  # sample i -> condition i // n
    z = np.concatenate(latents) if len(latents) > 1 else latents[0]
    q = np.concatenate(conditions) if len(conditions) > 1 else conditions[0]
    y = backend.run_chunked("convertor", {"z": z, "q": q}, converter.max_batch)["y"]  # (rows, 1, S, S)
    answers, start = [], 0
    for request in requests:
        stop = start + request.rows
        answers.append(y[start:stop].reshape(request.conditions.shape[0], request.n, size, size))
        start = stop
    return answers


@dataclass
class _Pending:
    item: Any
    rows: int
    deadline: float | None  # time.monotonic() after which the request is dropped
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)


class BatchQueue:
    """A bounded queue in front of `handler(list of items) -> list of answers`, run by one
    worker thread. A batch closes when it holds max_batch rows or when its first item has
    waited max_wait_ms; an item larger than max_batch rows runs alone.

    on_batch(rows, items), when given, is told the size of every batch run (for metrics).
    """

    def __init__(self, handler: Callable[[list], list], max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Callable[[int, int], None] | None = None,
                 name: str = "vce-batcher"):
        self._handler = handler
        self.max_batch = positive_int(max_batch, "max_batch")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not 0 <= max_wait_ms <= 10_000:
            raise InputError(f"max_wait_ms: expected a number of milliseconds in [0, 10000], got {max_wait_ms!r}")
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = positive_int(max_queue, "max_queue")
        self._on_batch = on_batch
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        return len(self._pending)

    def submit(self, item: Any, rows: int, timeout: float | None = None) -> concurrent.futures.Future:
        """Queue one item; its Future gets the answer, the handler's error, or RequestTimeoutError
        if it is still queued `timeout` seconds from now. Cancel the Future to withdraw it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = _Pending(item, rows, deadline)
        with self._ready:
            if self._closing:
                raise OverloadedError("the batcher is shutting down: expected new requests before close(), got one after")
            if len(self._pending) >= self.max_queue:
                raise OverloadedError(f"overloaded: {len(self._pending)} requests already queued (max_queue = "
                                      f"{self.max_queue}); retry later")
            self._pending.append(pending)
            self._ready.notify()
        return pending.future

    def close(self, wait: bool = True) -> None:
        """Refuse new items; with wait, finish every queued one first (graceful shutdown)."""
        with self._ready:
            self._closing = True
            if not wait:
                while self._pending:
                    self._pending.popleft().future.cancel()
            self._ready.notify()
        if wait:
            self._worker.join()

    # -- the worker ---------------------------------------------------------------------------

    def _take_batch(self) -> list[_Pending] | None:
        with self._ready:
            while not self._pending:
                if self._closing:
                    return None
                self._ready.wait()
            close_at = self._pending[0].enqueued + self.max_wait
            while not self._closing and sum(p.rows for p in self._pending) < self.max_batch:
                left = close_at - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            batch, rows = [], 0
            while self._pending and (not batch or rows + self._pending[0].rows <= self.max_batch):
                rows += self._pending[0].rows
                batch.append(self._pending.popleft())
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for pending in batch:
                if not pending.future.set_running_or_notify_cancel():
                    continue  # cancelled by its caller while queued
                if pending.deadline is not None and now > pending.deadline:
                    pending.future.set_exception(RequestTimeoutError(
                        f"request dropped: it waited {now - pending.enqueued:.3f} s in the queue, past its "
                        f"timeout of {pending.deadline - pending.enqueued:.3f} s"))
                    continue
                live.append(pending)
            if not live:
                continue
            try:
                answers = self._handler([p.item for p in live])
                if len(answers) != len(live):
                    raise RuntimeError(f"batch handler returned {len(answers)} answers for {len(live)} requests")
            except BaseException as err:  # noqa: BLE001 - every caller of the batch gets the error
                for pending in live:
                    pending.future.set_exception(err)
                continue
            if self._on_batch is not None:
                self._on_batch(sum(p.rows for p in live), len(live))
            for pending, answer in zip(live, answers):
                pending.future.set_result(answer)


class Batcher:
    """`Converter.convert` for many concurrent callers, merged into engine batches.

    max_batch: engine rows per merged batch (samples: B * n of each request), default 64.
    max_wait_ms: how long the first request of a batch waits for others (default 5 ms).
    max_queue: requests waiting at most; one more raises OverloadedError.
    timeout: default seconds a call may wait for its answer (None: no limit); past it the call
    raises RequestTimeoutError and its request is withdrawn.
    """

    def __init__(self, converter: Converter, max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, timeout: float | None = None,
                 on_batch: Callable[[int, int], None] | None = None):
        self.converter = converter
        self.timeout = timeout
        self._queue = BatchQueue(lambda requests: convert_merged(converter, requests), max_batch, max_wait_ms,
                                 max_queue, on_batch)

    @property
    def max_batch(self) -> int:
        return self._queue.max_batch

    @property
    def max_wait_ms(self) -> float:
        return self._queue.max_wait * 1000.0

    @property
    def depth(self) -> int:
        return self._queue.depth

    def submit(self, images: Any, n: int, seed: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
               timeout: float | None = None) -> concurrent.futures.Future:
        """Queue one convert call; the Future's result is what `converter.convert` would return."""
        request = make_request(self.converter, images, n, seed, temperature)
        return self.submit_request(request, timeout)

    def submit_request(self, request: ConvertRequest, timeout: float | None = None) -> concurrent.futures.Future:
        timeout = self.timeout if timeout is None else timeout
        return self._queue.submit(request, request.rows, timeout)

    def convert(self, images: Any, n: int, seed: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
                timeout: float | None = None) -> np.ndarray:
        """Blocking: the same answer as `converter.convert(images, n, seed, temperature)`."""
        timeout = self.timeout if timeout is None else timeout
        future = self.submit(images, n, seed, temperature, timeout)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeoutError(f"convert: no answer within the timeout of {timeout} s") from None

    async def convert_async(self, images: Any, n: int, seed: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
                            timeout: float | None = None) -> np.ndarray:
        """From asyncio: images are preprocessed in the default executor (decoding must not block
        the event loop); cancelling the awaiting task withdraws the request."""
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(None, make_request, self.converter, images, n, seed, temperature)
        return await self.convert_request_async(request, timeout)

    async def convert_request_async(self, request: ConvertRequest, timeout: float | None = None) -> np.ndarray:
        timeout = self.timeout if timeout is None else timeout
        future = asyncio.wrap_future(self.submit_request(request, timeout))  # cancelling it cancels the request
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"convert: no answer within the timeout of {timeout} s") from None

    def close(self, wait: bool = True) -> None:
        """Refuse new calls; with wait, answer every queued one first."""
        self._queue.close(wait)

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
