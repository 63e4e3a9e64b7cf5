"""Dynamic batching for a serving replica, on Ray Serve's `@serve.batch`.

The unit of batching is one text (a request with 32 texts is 32 items, so batches mix
requests freely). Three modes:

- tokens: a batch closes when the next text would push it past `max_batch_tokens` real
  tokens (Ray Serve 2.60's `batch_size_fn`) or past `max_batch_size` texts. The encoder
  drops padding before its layers, so real tokens are what a forward pass costs: a batch of
  short texts holds many, one of long texts few, and the forward time stays flat.
- count: a batch closes at `max_batch_size` texts, whatever their lengths.
- none: one forward pass per request (its own texts only), one at a time.

Two repairs to Ray Serve 2.60's batch queue (`adapt_batch_queue` swaps in `BatchQueue`):

- Continuous batching. Ray forms the next batch while the previous one runs: it waits
  `batch_wait_timeout_s` after a text arrives and queues what it has behind the running
  forward pass, so under steady load batches hold only what arrives in one wait window and
  a backlog of small forward passes builds up. `BatchQueue.get` (which Ray calls for the
  first text of every batch) first waits for the running batch to finish, so a batch takes
  everything that arrived meanwhile, up to the budget: batches grow with the load.
- FIFO. With a `batch_size_fn`, Ray puts the text that did not fit back at the *end* of the
  queue (see the NOTE in ray/serve/batching.py), so a long text can wait behind everything
  that arrived after it. `BatchQueue` puts it back at the front.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from .inference import Encoded


@dataclass(slots=True)
class Item:
    op: str  # "logits" | "cls" | "mean": what the forward pass returns for this text
    enc: Encoded  # one row
    tokens: int  # its real tokens
    enqueued: float  # perf_counter() when it was handed to the batcher
    started: bool = False  # its forward pass began (a request cancelled before that never starts)


def batch_cost(max_batch_tokens: int, max_batch_size: int) -> Callable[[list[Item]], int]:
    """`batch_size_fn` for tokens mode: the batch's real tokens, but at least its share of
    the budget per text, so that more than `max_batch_size` texts also exceed the budget."""
    def cost(items: list[Item]) -> int:
        by_count = -(-len(items) * max_batch_tokens // max_batch_size)  # ceil without floats
        return max(sum(i.tokens for i in items), by_count)
    return cost


class BatchQueue(asyncio.Queue):
    """An asyncio.Queue for Ray's batcher: an item taken out and put straight back (Ray
    deferring the text that overflowed a token batch) returns to the front; and `get`, with
    `running` (Ray's semaphore of running batches), returns only when no batch runs."""

    def __init__(self, running: asyncio.Semaphore | None = None):
        super().__init__()
        self._running = running

    def _init(self, maxsize):
        super()._init(maxsize)
        self._last_taken = None

    async def get(self):
        if self._running is not None:
            await asyncio.sleep(0)  # the batch Ray has just formed takes the semaphore first ...
            async with self._running:  # ... and this waits until it has run
                pass
        return await super().get()

    def _get(self):
        item = super()._get()
        self._last_taken = item
        return item

    def _put(self, item):
        if item is self._last_taken:
            self._last_taken = None
            self._queue.appendleft(item)
        else:
            self._queue.append(item)


def adapt_batch_queue(batched) -> None:
    """Give a `@serve.batch` function's queue the `BatchQueue` behaviour. Call it inside the
    replica's event loop before the first item is queued. Ray keeps its lazily built queue on
    the wrapper whose bound methods it attaches to the function; if that ever changes this
    fails loudly (the serving tests cover it) rather than silently losing the behaviour. If
    the semaphore handshake ever stopped holding, batches would only be smaller again."""
    wrapper = batched.set_max_batch_size.__self__  # ray.serve.batching._LazyBatchQueueWrapper
    queue = wrapper.queue  # builds ray's _BatchQueue and schedules its consumer (not yet running)
    if not isinstance(queue.queue, asyncio.Queue) or not queue.queue.empty() or \
            not isinstance(queue.semaphore, asyncio.Semaphore) or queue.max_concurrent_batches != 1:
        raise RuntimeError("Ray Serve's batch queue is not the one this code knows (ray.serve.batching changed)")
    queue.queue = BatchQueue(queue.semaphore)
