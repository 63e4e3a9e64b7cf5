"""Dynamic batching for a serving replica, on Ray Serve's `@serve.batch`.

The unit of batching is one text (a request with 32 texts is 32 items, so batches mix
requests freely). Three modes:

- tokens: a batch closes when the next text would push it past `max_batch_tokens` real
  tokens (Ray Serve 2.60's `batch_size_fn`) or past `max_batch_size` texts. The encoder
  drops padding before its layers, so real tokens are what a forward pass costs: a batch of
  short texts holds many, one of long texts few, and the forward time stays flat.
- count: a batch closes at `max_batch_size` texts, whatever their lengths.
- none: one forward pass per request (its own texts only), one at a time.

FIFO: with a `batch_size_fn`, Ray puts the text that did not fit back at the *end* of its
queue (see the NOTE in ray/serve/batching.py), so under steady load a long text can wait
behind everything that arrived after it. `keep_fifo` swaps in a queue that puts that text
back at the front: batches leave in arrival order, as in count mode.
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


class FrontRequeue(asyncio.Queue):
    """An asyncio.Queue where an item that was just taken out and is put back (Ray deferring
    the text that overflowed a token batch) goes back to the front, not the end."""

    def _init(self, maxsize):
        super()._init(maxsize)
        self._last_taken = None

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


def keep_fifo(batched) -> None:
    """Give a `@serve.batch` function's queue the FIFO requeue. Call it inside the replica's
    event loop before the first item is queued. Ray keeps its lazily built queue on the
    wrapper whose bound methods it attaches to the function; if that ever changes this fails
    loudly (the serving tests cover it) rather than silently losing the order."""
    wrapper = batched.set_max_batch_size.__self__  # ray.serve.batching._LazyBatchQueueWrapper
    queue = wrapper.queue  # builds ray's _BatchQueue and schedules its consumer (not yet running)
    if not isinstance(queue.queue, asyncio.Queue) or not queue.queue.empty():
        raise RuntimeError("Ray Serve's batch queue is not an empty asyncio.Queue: cannot keep FIFO order")
    queue.queue = FrontRequeue()
