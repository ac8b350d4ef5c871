"""Gateway-side micro-batching: concurrent backend calls merged into one.

Every request makes its own backend calls (image encoder, text encoder, reward head). Under load
many are issued at nearly the same time, and each costs a gRPC round trip and a Triton request
(for a Python-backend model, an IPC hand-over to its stub) whatever its size. `CoalescingBackend`
wraps a backend and merges them:

- a call joins the queue of its method and row shape (image size, token width; the reward head's
  inputs all have fixed row shapes);
- while fewer than `max_in_flight` merged calls of that queue are out, the queue is sent at the
  end of the current event-loop turn (calls issued together go together); otherwise it waits
  until one returns. At low load every call goes alone, with no added delay; under load, calls
  pile up while the backend works and one round trip carries them all (at most `max_rows` rows
  and `max_bytes` input bytes, the exported model's limits);
- each caller gets exactly its own rows back. A merged answer with the wrong number of rows
  fails every caller (`BackendError`) rather than hand anyone another caller's rows; a failed
  merged call fails each of its callers with (a copy of) that error; a caller that gave up (its
  timeout, its request cancelled) is dropped from the queue, or its rows are discarded, and the
  others are untouched; a merged call whose callers have all given up is cancelled, and each is
  bounded by `timeout_s`, so a hung backend cannot hold the queue's slots;
- a queue with nothing waiting or out is dropped (image sizes come and go).

`max_in_flight = 0` turns merging off (every call passes straight through).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from service.gateway.backend import (
    BackendError,
    BackendTimeout,
    CallBound,
    RewardBackendProtocol,
    own_copy,
)
from service.gateway.metrics import GatewayMetrics

Output = np.ndarray | dict[str, np.ndarray]
Send = Callable[..., Awaitable[Output]]
# Merged inputs above this many bytes are concatenated in a worker thread, not on the event
# loop (192 MiB stalled the loop 60 ms warm, 1.4 s cold); below it a thread hop costs more.
OFF_LOOP_BYTES = 4 << 20


@dataclass
class _Call:
    arrays: tuple[np.ndarray, ...]
    future: asyncio.Future[Output]

    @property
    def rows(self) -> int:
        return len(self.arrays[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


@dataclass
class CallQueue:
    """Calls of one method and row shape, sent merged (see the module docstring)."""

    name: str
    send: Send
    max_rows: int
    max_bytes: int
    max_in_flight: int
    timeout_s: float | None = None  # of each merged call (None: the backend's own deadline)
    observe: Callable[[int], None] | None = None  # told the callers of each merged call
    on_idle: Callable[[], None] | None = None  # nothing waiting or out any more
    waiting: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0
    merged_calls: int = 0  # merged calls sent so far
    _scheduled: bool = False
    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def call(self, *arrays: np.ndarray) -> Output:
        future: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Call(arrays, future))
        self._schedule()
        return await future  # cancelled with the caller: its rows are skipped or discarded

    def _schedule(self) -> None:
        if not self._scheduled and self.waiting and self.in_flight < self.max_in_flight:
            self._scheduled = True
            # a fresh context: the merged call belongs to no single request
            asyncio.get_running_loop().call_soon(self._dispatch, context=contextvars.Context())

    def _dispatch(self) -> None:
        self._scheduled = False
        while self.in_flight < self.max_in_flight:
            batch = self._take()
            if not batch:
                break
            self.in_flight += 1
            self.merged_calls += 1
            if self.observe is not None:
                self.observe(len(batch))
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            # bookkeeping in a done-callback: it runs even for a task cancelled before it started
            task.add_done_callback(functools.partial(self._finished, batch))
            waiting = [len(batch)]  # callers of this merged call still waiting for it
            for call in batch:
                call.future.add_done_callback(functools.partial(self._caller_done, task, waiting))
        self._maybe_idle()

    @staticmethod
    def _caller_done(task: asyncio.Task, waiting: list[int], _future: asyncio.Future) -> None:
        """Every caller gone (timed out, cancelled) before the answer: stop the call, freeing
        its slot rather than holding it for work nobody will read."""
        waiting[0] -= 1
        if waiting[0] == 0 and not task.done():
            task.cancel()

    def _finished(self, batch: list[_Call], task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1
        for call in batch:  # a task cancelled before or while sending: so are its callers
            call.future.cancel()  # (no-op for the futures it has already settled)
        self._schedule()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.on_idle is not None and not self.waiting and self.in_flight == 0:
            self.on_idle()

    def _take(self) -> list[_Call]:
        """The next merged call: waiting calls in order, up to max_rows and max_bytes (a call
        alone may be larger: the guard has already split it to the backend's limits)."""
        batch: list[_Call] = []
        rows = nbytes = 0
        while self.waiting:
            call = self.waiting[0]
            if call.future.done():  # its caller gave up
                self.waiting.popleft()
                continue
            full = rows + call.rows > self.max_rows or nbytes + call.nbytes > self.max_bytes
            if batch and full:
                break
            batch.append(self.waiting.popleft())
            rows += call.rows
            nbytes += call.nbytes
        return batch

    async def _run(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                arrays = list(batch[0].arrays)
            elif sum(c.nbytes for c in batch) > OFF_LOOP_BYTES:  # a copy of up to max_bytes
                arrays = await asyncio.to_thread(_concatenated, batch)
            else:
                arrays = _concatenated(batch)
            out = await asyncio.wait_for(self.send(*arrays), self.timeout_s)
            del arrays
            parts = _split(self.name, out, [c.rows for c in batch])
        except TimeoutError:
            self._fail(batch, BackendTimeout(f"{self.name}: no answer within {self.timeout_s:g} s"))
        except Exception as exc:  # every caller gets the failure, each its own copy
            self._fail(batch, exc)
        else:
            for call, part in zip(batch, parts, strict=True):
                if not call.future.done():
                    call.future.set_result(part)

    @staticmethod
    def _fail(batch: list[_Call], exc: Exception) -> None:
        for call in batch:
            if not call.future.done():
                call.future.set_exception(own_copy(exc))


def _concatenated(batch: Sequence[_Call]) -> list[np.ndarray]:
    """The callers' inputs stacked, input by input, into one call's."""
    return [np.concatenate(p) for p in zip(*(c.arrays for c in batch), strict=True)]


def _split(name: str, out: Output, rows: Sequence[int]) -> list[Output]:
    """The merged answer cut back into each caller's rows; the wrong total fails them all."""
    total = sum(rows)
    values = out.values() if isinstance(out, dict) else (out,)
    for value in values:
        if np.ndim(value) == 0 or len(value) != total:
            got = "a scalar" if np.ndim(value) == 0 else f"{len(value)} rows"
            raise BackendError(f"{name}: the merged answer has {got} for {total} rows")
    bounds = np.cumsum([0, *rows])
    cuts = list(zip(bounds[:-1], bounds[1:], strict=True))
    if isinstance(out, dict):
        return [{k: np.asarray(v)[a:b] for k, v in out.items()} for a, b in cuts]
    return [np.asarray(out)[a:b] for a, b in cuts]


class CoalescingBackend:
    """A backend whose inference calls are merged across concurrent callers (module docstring).

    Everything else (readiness, export hashes, close, the models it calls) is the wrapped
    backend's."""

    def __init__(
        self,
        backend: RewardBackendProtocol,
        *,
        max_rows: int,
        max_bytes: int,
        max_in_flight: int,
        timeout_s: float | None = None,
        metrics: GatewayMetrics | None = None,
        bound: CallBound | None = None,
    ) -> None:
        """`bound`: a slot of it is taken by every call sent (merged or, with merging off,
        alone), never by a caller waiting to be merged."""
        self.backend = backend
        self.bound = bound
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.max_rows = max(1, max_rows)
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.queues: dict[tuple, CallQueue] = {}

    def __getattr__(self, name: str) -> Any:  # models, model_stats, connect, ...
        return getattr(self.backend, name)

    def _queue(self, method: str, arrays: Sequence[np.ndarray]) -> CallQueue:
        key = (method, *((a.shape[1:], a.dtype.str) for a in arrays))
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = CallQueue(
                method,
                functools.partial(self._send, method),
                max_rows=self.max_rows,
                max_bytes=self.max_bytes,
                max_in_flight=self.max_in_flight,
                timeout_s=self.timeout_s,
                observe=self.metrics.merged_calls.labels(method).observe if self.metrics else None,
                on_idle=lambda: self.queues.pop(key, None),  # image sizes come and go
            )
        return queue

    async def _send(self, method: str, *arrays: np.ndarray) -> Output:
        async with self.bound.slot() if self.bound else contextlib.nullcontext():
            return await getattr(self.backend, method)(*arrays)

    async def _call(self, method: str, *arrays: np.ndarray) -> Output:
        if self.max_in_flight <= 0:
            return await self._send(method, *arrays)
        return await self._queue(method, arrays).call(*arrays)

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, await self._call("encode_images", images))

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, await self._call("encode_texts", ids))

    async def rewards(
        self,
        image_embeds: np.ndarray,
        prompt_embeds: np.ndarray,
        prompt_mask: np.ndarray,
        scale: np.ndarray,
        lam: np.ndarray,
    ) -> dict[str, np.ndarray]:
        arrays = (image_embeds, prompt_embeds, prompt_mask, scale, lam)
        return cast(dict[str, np.ndarray], await self._call("rewards", *arrays))

    async def ready(self) -> bool:
        return await self.backend.ready()

    async def export_hashes(self, models: Sequence[str]) -> dict[str, str | None]:
        return await self.backend.export_hashes(models)

    async def close(self) -> None:
        await self.backend.close()
