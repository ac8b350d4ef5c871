"""What the gateway needs from a reward backend, its error types, and the guard rails.

`RewardBackendProtocol` is the interface the app depends on; `triton_backend.RewardBackend`
(Triton over gRPC, production) and `onnx_backend.OnnxBackend` (ONNX Runtime in process,
development and tests) implement it. Every implementation raises only these errors:
`BackendUnavailable` (answer 503 with Retry-After; `BackendTimeout`, a subclass, 504),
`ModelMismatch` (the backend serves other models than the provenance names: 503, and
`/readyz` says why) and
`BackendError` (the backend failed on the request: 502).

`GuardedBackend` wraps any implementation for the gateway: every call gets a timeout (a hung
backend becomes `BackendTimeout`, 504, never a hung request), inference calls take a slot of
their request's bound (`request_call_slots`, a context variable the route sets) before they
go out, batches are split to the exported
model's maximum batch size (image batches also to at most MAX_CALL_BYTES, far below gRPC's 2 GB
message limit) and sent concurrently (so Triton's dynamic batcher can merge them),
outputs are checked for shape and finiteness (`BackendError` otherwise), unexpected exceptions
become `BackendError`, and each call's round-trip time is recorded in the metrics.

`CallBound` bounds the calls that actually go out to the backend (one for all models of the
export); `coalescing.CoalescingBackend` takes its slots for the calls it sends
(`app.guarded_backend` stacks guard → merging → backend): callers waiting to be merged hold no
slot, so they can fill a merged call to the max batch whatever the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextvars import ContextVar
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from service.gateway.identity import IdentityCheck
from service.gateway.metrics import GatewayMetrics

T = TypeVar("T")
READY_TIMEOUT_S = 5.0
MAX_CALL_BYTES = 1 << 30  # image bytes per backend call (gRPC messages are limited to 2 GB)
# The current request's bound on its backend calls in flight (set by `request_call_slots`);
# gathered tasks copy the context, so every chunk of the request shares it.
_REQUEST_SLOTS: ContextVar[asyncio.Semaphore | None] = ContextVar("request_slots", default=None)


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """`asyncio.gather`, but the first failure cancels the others: a request that has already
    failed must not keep its other backend calls out, holding slots and Triton's time."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def own_copy(exc: Exception) -> Exception:
    """The same error for one of several waiters on one call (its own traceback; the original's
    cause as its cause): the shared error's traceback holds the call's frames and inputs."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:
        copy = BackendError(f"{type(exc).__name__}: {exc}")
    copy.__cause__ = exc.__cause__
    return copy


@contextlib.contextmanager
def request_call_slots(limit: int):
    """Within this block, the current task's backend calls are at most `limit` at once."""
    token = _REQUEST_SLOTS.set(asyncio.Semaphore(limit))
    try:
        yield
    finally:
        _REQUEST_SLOTS.reset(token)


class BackendUnavailable(RuntimeError):
    """The backend cannot serve now (down, restarting, model not loaded): 503."""


class StubUnhealthy(BackendUnavailable):
    """Triton answers that a Python-backend stub is not healthy (dead or stuck): Triton does
    not recover it by itself; `serve`'s watchdog restarts Triton (503 meanwhile)."""


class BackendTimeout(BackendUnavailable):
    """A call ran past its timeout (the backend is slow or hung): 504."""


class ModelMismatch(BackendUnavailable):
    """The backend's models are not the ones the gateway's provenance names: never score."""


class BackendError(RuntimeError):
    """The backend answered with an error about the request or the model: 502."""


@runtime_checkable
class RewardBackendProtocol(Protocol):
    """The three reward models (DESIGN.md 4) as the gateway calls them."""

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB (one size per call) → float32 [B, D] unit embeddings."""
        ...

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        """int64 [B, T] token ids (2 ≤ T ≤ 77, rows padded with the end token) → float32
        [B, D] unit embeddings."""
        ...

    async def rewards(
        self,
        image_embeds: np.ndarray,
        prompt_embeds: np.ndarray,
        prompt_mask: np.ndarray,
        scale: np.ndarray,
        lam: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """[B,D], [B,33,D], bool [B,33], [B,1], [B,1] → {"RAW": [B,1], "TEXTNORM": [B,1], ...}."""
        ...

    async def ready(self) -> bool: ...

    async def export_hashes(self, models: Sequence[str]) -> dict[str, str | None]:
        """The export content hash each of `models` carries in its config (None: no hash)."""
        ...

    async def close(self) -> None: ...


class CallBound:
    """The overall bound on inference calls out to the backend at once, shared by every
    model of the export (its slots and their use are exported as the `backend_calls` budget)."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self._semaphore = asyncio.Semaphore(limit)
        self._metrics = metrics
        metrics.admission_limit.labels("backend_calls").set(limit)
        metrics.admission_in_use.labels("backend_calls").set(0)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            self.in_flight += 1
            self._metrics.admission_in_use.labels("backend_calls").set(self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1
                self._metrics.admission_in_use.labels("backend_calls").set(self.in_flight)


class GuardedBackend:
    """Identity checks, timeouts, batch splitting, output checks and timing around a backend.

    The overall bound on calls out is not here but in the merging, on the calls it sends
    (`CallBound`; the gateway builds the whole stack with `app.guarded_backend`)."""

    def __init__(
        self,
        backend: RewardBackendProtocol,
        *,
        identity: IdentityCheck,
        timeout_s: float,
        max_batch: int,
        embed_dim: int,
        metrics: GatewayMetrics,
        identity_interval_s: float = 10.0,
        max_call_bytes: int = MAX_CALL_BYTES,
        member: bool = False,
    ) -> None:
        """`member`: the backend of a further ensemble member (the first model's guard
        reports a mismatch of any model in the metrics)."""
        self.backend = backend
        self.identity = identity
        self.identity_interval_s = identity_interval_s
        self.timeout_s = timeout_s
        self.max_batch = max(1, int(max_batch))
        self.max_call_bytes = max_call_bytes
        self.embed_dim = embed_dim
        self.metrics = metrics
        self._checked_at: float | None = None  # monotonic time of the last identity answer
        self._mismatch: str | None = None  # the last answer's problem
        self._identity_check: asyncio.Future[None] | None = None  # the one check in flight
        self._member = member

    async def verify_identity(self, force: bool = False) -> None:
        """Raise ModelMismatch unless the backend serves the provenance's export.

        Reuses the last answer while it is younger than `identity_interval_s` (unless `force`).
        Concurrent callers share the one check in flight, its failure too: with the backend
        hung, N callers fail together after one check's timeout, not one after another. An
        unreachable backend raises BackendUnavailable and leaves the last answer as it was."""
        if force or not self._identity_fresh():
            check = self._identity_check
            if check is None:
                check = self._identity_check = asyncio.ensure_future(self._check_identity())
                check.add_done_callback(self._identity_checked)
            try:
                await asyncio.shield(check)  # a waiter that gives up leaves it to the others
            except (BackendUnavailable, BackendError) as exc:
                raise own_copy(exc) from exc.__cause__
        if self._mismatch is not None:
            raise ModelMismatch(self._mismatch)

    def _identity_checked(self, check: asyncio.Future) -> None:
        """The check is over: the next caller past the interval starts a new one. Its error is
        marked seen (every waiter may have gone) and not kept."""
        self._identity_check = None
        if not check.cancelled():
            check.exception()

    async def _check_identity(self) -> None:
        found = await self._call(
            "export_hashes",
            self.backend.export_hashes(self.identity.models),
            min(self.timeout_s, READY_TIMEOUT_S),
        )
        self._mismatch = self.identity.problem(found)
        self._checked_at = time.monotonic()
        if not self._member:  # the first guard checks every model of the export
            self.metrics.model_mismatch.set(1 if self._mismatch else 0)

    def _identity_fresh(self) -> bool:
        return (
            self._checked_at is not None
            and time.monotonic() - self._checked_at < self.identity_interval_s
        )

    async def _inference(self, call: str, coro_fn, *args):
        """An inference call within a slot of its request's bound (if it has one); the timeout
        covers the wait for the slot too (a hung backend holds every slot: the waiters must
        not wait beyond their deadline)."""

        async def bounded():
            async with _REQUEST_SLOTS.get() or contextlib.nullcontext():
                return await coro_fn(*args)

        return await self._call(call, bounded())

    async def _call(self, call: str, coro, timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except TimeoutError:
            outcome = "timeout"
            raise BackendTimeout(f"{call}: no answer within {timeout_s:g} s") from None
        except BackendTimeout:
            outcome = "timeout"
            raise
        except BackendUnavailable:
            outcome = "unavailable"
            raise
        except BackendError:
            outcome = "error"
            raise
        except Exception as exc:  # a backend bug or an unexpected transport error
            outcome = "error"
            raise BackendError(f"{call}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.backend_seconds.labels(call, outcome).observe(time.perf_counter() - start)

    def _chunks(self, n: int, row_bytes: int = 0) -> list[slice]:
        """Slices of at most max_batch rows and (one row at least) max_call_bytes."""
        step = self.max_batch
        if row_bytes > 0:
            step = max(1, min(step, self.max_call_bytes // row_bytes))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _check_embeddings(self, call: str, out: object, n: int) -> np.ndarray:
        arr = np.asarray(out)
        if arr.shape != (n, self.embed_dim):
            raise BackendError(
                f"{call}: expected embeddings of shape ({n}, {self.embed_dim}), got {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise BackendError(f"{call}: non-finite values in the embeddings")
        return arr.astype(np.float32, copy=False)

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        await self.verify_identity()
        parts = await gather_or_cancel(
            *(
                self._inference("encode_images", self.backend.encode_images, images[s])
                for s in self._chunks(len(images), images[0].nbytes if len(images) else 0)
            )
        )
        return self._check_embeddings("encode_images", np.concatenate(parts), len(images))

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        await self.verify_identity()
        parts = await gather_or_cancel(
            *(
                self._inference("encode_texts", self.backend.encode_texts, ids[s])
                for s in self._chunks(len(ids))
            )
        )
        return self._check_embeddings("encode_texts", np.concatenate(parts), len(ids))

    async def rewards(
        self,
        image_embeds: np.ndarray,
        prompt_embeds: np.ndarray,
        prompt_mask: np.ndarray,
        scale: np.ndarray,
        lam: np.ndarray,
    ) -> dict[str, np.ndarray]:
        await self.verify_identity()
        n = len(image_embeds)
        parts = await gather_or_cancel(
            *(
                self._inference(
                    "rewards",
                    self.backend.rewards,
                    image_embeds[s],
                    prompt_embeds[s],
                    prompt_mask[s],
                    scale[s],
                    lam[s],
                )
                for s in self._chunks(n)
            )
        )
        out: dict[str, np.ndarray] = {}
        for name in parts[0]:
            if any(name not in p for p in parts):
                raise BackendError(f"rewards: output {name} missing from part of the batch")
            value = np.concatenate([np.asarray(p[name]).reshape(-1) for p in parts])
            if value.shape != (n,):
                raise BackendError(f"rewards: output {name} has {value.size} values for {n} items")
            if not np.all(np.isfinite(value)):
                raise BackendError(f"rewards: non-finite values in {name}")
            out[name] = value.astype(np.float64)
        if "RAW" not in out or "TEXTNORM" not in out:
            raise BackendError(f"rewards: RAW and TEXTNORM expected, got {sorted(out)}")
        return out

    async def readiness(self) -> tuple[bool, str | None]:
        """(ready, why not): the backend is ready and serves the provenance's export (checked
        anew). Never waits longer than READY_TIMEOUT_S (an orchestrator's probe must not wait
        for the scoring timeout)."""
        timeout_s = min(self.timeout_s, READY_TIMEOUT_S)

        async def check() -> bool:
            await self.verify_identity(force=True)  # first: a mismatch is the reason to give
            return bool(await self._call("ready", self.backend.ready(), timeout_s))

        try:  # both checks within one READY_TIMEOUT_S, as a probe's timeout expects
            if not await asyncio.wait_for(check(), timeout_s):
                return False, "the reward backend is not ready (models loading or server down)"
        except TimeoutError:
            return False, f"the reward backend did not answer within {timeout_s:g} s"
        except (BackendUnavailable, BackendError) as exc:
            return False, str(exc)
        return True, None

    async def ready(self) -> bool:
        return (await self.readiness())[0]
