"""Dynamic batching: merged requests get exactly their lone answers, batches really merge,
and the queue is bounded, times out and can be cancelled."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vce_deploy import Batcher, Converter, InputError, OverloadedError, RequestTimeoutError
from vce_deploy.batching import BatchQueue, convert_merged, make_request


@pytest.fixture(scope="module")
def converter() -> Converter:
    return Converter.load(backend="onnxruntime", device="cpu", threads=1)  # the shipped bundle


def glyph(k: int) -> np.ndarray:
    """A distinct 32x32 glyph per k: a bar at a position that depends on k."""
    image = np.full((32, 32), 255, np.uint8)
    image[4:28, 2 + (k % 26):6 + (k % 26)] = 0
    image[4 + (k % 20):8 + (k % 20), 4:28] = 0
    return image


CASES = [(glyph(0), 1, 0), (glyph(1), 3, 1), (np.stack([glyph(2), glyph(3)]), 2, 2), (glyph(4), 5, 12345),
         (glyph(5), 1, 2**31 - 1), (glyph(6), 4, 7)]


def test_merged_equals_alone(converter):
    """One merged engine batch of requests with different seeds, n and B: every answer equals
    the same call made alone (noise per request, never per batch)."""
    requests = [make_request(converter, images, n, seed) for images, n, seed in CASES]
    merged = convert_merged(converter, requests)
    for (images, n, seed), got in zip(CASES, merged):
        alone = converter.convert(images, n, seed=seed)
        assert got.shape == alone.shape
        # bit for bit: "the same seed gives the same output on the same backend, whatever the
        # batching" (docs/serving.md); ONNX Runtime's CPU convs compute each row on its own
        np.testing.assert_array_equal(got, alone)
    # and the merge is not a no-op: a different seed gives a different answer
    other = converter.convert(CASES[1][0], CASES[1][1], seed=99)
    assert np.abs(other - merged[1]).max() > 1e-3


def test_merged_across_chunks(converter):
    """Requests whose merged rows exceed the converter's max_batch are cut into engine chunks
    and still come back intact and in order."""
    small = Converter.load(backend="onnxruntime", device="cpu", threads=1, max_batch=4)
    requests = [make_request(small, glyph(k), 3, seed=k) for k in range(5)]  # 15 rows, chunks of 4
    for k, got in enumerate(convert_merged(small, requests)):
        np.testing.assert_allclose(got, converter.convert(glyph(k), 3, seed=k), rtol=0, atol=1e-5)


def test_threads_merge_and_match(converter):
    """32 threads at once: batches of more than one request happen, and no answer is mixed up."""
    sizes = []
    with Batcher(converter, max_batch=64, max_wait_ms=50, on_batch=lambda rows, count: sizes.append(count)) as batcher:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda k: batcher.convert(glyph(k), 2, seed=1000 + k), range(32)))
    for k, got in enumerate(answers):
        np.testing.assert_allclose(got, converter.convert(glyph(k), 2, seed=1000 + k), rtol=0, atol=1e-5)
    assert sum(sizes) == 32 and max(sizes) > 1, sizes


def test_asyncio_merge_and_match(converter):
    async def main():
        with Batcher(converter, max_batch=64, max_wait_ms=50) as batcher:
            return await asyncio.gather(*(batcher.convert_async(glyph(k), 1, seed=k) for k in range(16)))

    for k, got in enumerate(asyncio.run(main())):
        np.testing.assert_allclose(got, converter.convert(glyph(k), 1, seed=k), rtol=0, atol=1e-5)


def test_bad_input_fails_its_own_call_only(converter):
    with Batcher(converter, max_wait_ms=20) as batcher:
        good = batcher.submit(glyph(0), 1, seed=0)
        with pytest.raises(InputError, match="n: expected an integer >= 1"):
            batcher.convert(glyph(1), 0, seed=0)
        with pytest.raises(InputError, match="seed"):
            batcher.convert(glyph(1), 1, seed="7")
        np.testing.assert_allclose(good.result(5), converter.convert(glyph(0), 1, seed=0), atol=1e-5)


class Gate:
    """A handler that blocks until released: lets a test fill the queue deterministically."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.release.wait(10)
        return [item * 2 for item in items]


def test_bounded_queue_overloads_clearly():
    gate = Gate()
    queue = BatchQueue(gate, max_batch=1, max_wait_ms=0, max_queue=2)
    first = queue.submit(1, 1)
    gate.started.wait(5)  # the worker holds item 1; the queue is empty again
    queued = [queue.submit(2, 1), queue.submit(3, 1)]
    with pytest.raises(OverloadedError, match=r"2 requests already queued \(max_queue = 2\)"):
        queue.submit(4, 1)
    gate.release.set()
    assert [first.result(5)] + [f.result(5) for f in queued] == [2, 4, 6]
    queue.close()
    with pytest.raises(OverloadedError, match="shutting down"):
        queue.submit(5, 1)


def test_timeout_and_cancellation_withdraw_requests():
    gate = Gate()
    seen = []
    queue = BatchQueue(lambda items: seen.extend(items) or gate(items), max_batch=1, max_wait_ms=0)
    queue.submit(1, 1)
    gate.started.wait(5)
    expiring = queue.submit(2, 1, timeout=0.01)
    cancelled = queue.submit(3, 1)
    assert cancelled.cancel()
    kept = queue.submit(4, 1)
    time.sleep(0.05)
    gate.release.set()
    with pytest.raises(RequestTimeoutError, match="past its timeout"):
        expiring.result(5)
    assert kept.result(5) == 8
    assert seen == [1, 4]  # neither the expired nor the cancelled item reached the handler
    queue.close()


def test_batch_closes_on_rows_or_wait():
    sizes = []
    queue = BatchQueue(lambda items: items, max_batch=4, max_wait_ms=1500, on_batch=lambda rows, n: sizes.append(rows))
    start = time.monotonic()
    futures = [queue.submit(k, 2) for k in range(2)]  # 4 rows: full, runs without waiting 1.5 s
    [f.result(5) for f in futures]
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    lone = queue.submit(9, 1)
    assert lone.result(5) == 9 and time.monotonic() - start >= 1.5  # alone: waited max_wait
    big = queue.submit(10, 50)  # larger than max_batch: runs alone
    assert big.result(5) == 10
    assert sizes == [4, 1, 50]
    queue.close()


def test_close_drains_and_handler_errors_reach_callers():
    def failing(items):
        raise RuntimeError("engine fell over")

    queue = BatchQueue(failing, max_batch=8, max_wait_ms=100)
    futures = [queue.submit(k, 1) for k in range(3)]
    queue.close(wait=True)  # drains: the queued items run (and fail) before close returns
    for future in futures:
        with pytest.raises(RuntimeError, match="engine fell over"):
            future.result(0)


def test_timeout_from_caller(converter):
    with Batcher(converter, max_wait_ms=0) as batcher:
        gate = threading.Event()
        original = batcher._queue._handler
        batcher._queue._handler = lambda items: gate.wait(5) and original(items)
        with pytest.raises(RequestTimeoutError, match="within the timeout of 0.05 s"):
            batcher.convert(glyph(0), 1, seed=0, timeout=0.05)
        gate.set()


def test_cancelling_an_asyncio_task_withdraws_its_request(converter):
    seen = []

    async def main():
        with Batcher(converter, max_batch=64, max_wait_ms=0) as batcher:
            gate, entered = threading.Event(), threading.Event()
            original = batcher._queue._handler
            batcher._queue._handler = lambda items: (seen.append(len(items)), entered.set(), gate.wait(30),
                                                     original(items))[3]
            first = asyncio.create_task(batcher.convert_async(glyph(0), 1, seed=0))
            while not entered.is_set():  # the first request is in the engine, held at the gate
                await asyncio.sleep(0.01)
            second = asyncio.create_task(batcher.convert_async(glyph(1), 1, seed=1))
            while batcher.depth == 0:  # the second is queued behind it
                await asyncio.sleep(0.01)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second  # by now the cancellation has reached its queued request
            gate.set()
            return await first

    np.testing.assert_allclose(asyncio.run(main()), converter.convert(glyph(0), 1, seed=0), atol=1e-5)
    assert seen == [1]  # the cancelled request never reached the engine
