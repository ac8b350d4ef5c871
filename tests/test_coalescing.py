"""Gateway-side merging of concurrent backend calls (service/gateway/coalescing.py).

A scripted backend stands in for Triton here (unit tests of the merging itself); the real stack
merges under load in tests/test_serving.py (`test_concurrent_rest_requests_are_batched`)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.gateway.app import guarded_backend
from service.gateway.backend import BackendError, BackendTimeout, CallBound, GuardedBackend
from service.gateway.coalescing import CoalescingBackend
from service.gateway.identity import IdentityCheck
from service.gateway.metrics import GatewayMetrics
from service.settings import Settings

pytestmark = pytest.mark.serial

D = 4


class Gated:
    """Answers the k-th call once `release` has let k calls through; records every call's row
    count. An image's embedding is its first pixel's value repeated, so every row says whose
    it is."""

    def __init__(self, drop_rows: int = 0, fail: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.released = 0
        self.changed = asyncio.Condition()
        self.drop_rows = drop_rows
        self.fail = fail

    async def release(self, calls: int = 1 << 30) -> None:
        async with self.changed:
            self.released += calls
            self.changed.notify_all()

    async def _wait(self) -> None:
        k = len(self.calls)
        async with self.changed:
            await self.changed.wait_for(lambda: self.released >= k)

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        await self._wait()
        if self.fail is not None:
            raise self.fail
        out = np.repeat(images[:, 0, 0, :1].astype(np.float32), D, axis=1)
        return out[: len(out) - self.drop_rows]

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        self.calls.append(len(ids))
        await self._wait()
        return np.repeat(ids[:, :1].astype(np.float32), D, axis=1)

    async def rewards(self, image_embeds, prompt_embeds, prompt_mask, scale, lam):
        self.calls.append(len(image_embeds))
        await self._wait()
        raw = image_embeds[:, :1] * scale
        return {"RAW": raw, "TEXTNORM": raw + lam}

    async def ready(self) -> bool:
        return True

    async def export_hashes(self, models):
        return dict.fromkeys(models, "h")

    async def close(self) -> None:
        pass


def images_of(*owners: int, size: int = 8) -> list[np.ndarray]:
    return [np.full((1, size, size, 3), k, np.uint8) for k in owners]


def bounded(coro, timeout_s: float = 5.0):
    """asyncio.run with a deadline: a queue that stops dispatching fails the test, not CI."""

    async def run():
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(run())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_calls_waiting_behind_a_busy_backend_go_as_one_and_each_gets_its_own_rows():
    async def run() -> tuple[list[int], list[np.ndarray]]:
        inner = Gated()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)
        first = asyncio.create_task(merged.encode_images(images_of(100)[0]))
        await settle()  # the first call is out; the next ones wait behind it
        batch = np.concatenate(images_of(1, 2))  # a caller with two rows
        rest = [
            asyncio.create_task(merged.encode_images(x))
            for x in (images_of(7)[0], batch, images_of(9)[0])
        ]
        await settle()
        await inner.release()
        return inner.calls, await asyncio.gather(first, *rest)

    calls, outs = bounded(run())
    assert calls == [1, 4]  # one call alone, then the three waiting callers' four rows together
    assert [o[:, 0].tolist() for o in outs] == [[100], [7], [1, 2], [9]]
    assert all(o.shape[1] == D for o in outs)


def test_a_lone_call_goes_at_once_and_merging_off_sends_every_call_alone():
    async def run(in_flight: int) -> list[int]:
        inner = Gated()
        await inner.release()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=in_flight)
        out = await merged.encode_images(images_of(3)[0])
        assert out[:, 0].tolist() == [3]
        await asyncio.gather(*(merged.encode_images(x) for x in images_of(1, 2, 3, 4)))
        return inner.calls

    assert bounded(run(0)) == [1, 1, 1, 1, 1]
    # calls issued in the same event-loop turn go together; one is already out only when
    # max_in_flight is reached
    assert bounded(run(2)) == [1, 4]


@pytest.mark.parametrize("max_backend_calls", [None, 1])
def test_waiting_callers_fill_a_merged_call_to_the_max_batch_whatever_the_bound_on_calls(
    clean_reward_env: pytest.MonkeyPatch, max_backend_calls: int | None
) -> None:
    """Callers waiting to be merged hold no slot of the bound on calls out
    (`max_backend_calls`): when they did, a bound below the max batch capped every merged call
    (at 16, a ViT-B/32's image batches under 32 clients averaged 6.7 rows; README, admission
    control). Built as the gateway builds it (`app.guarded_backend`), with the default
    settings and with a bound of one call."""
    if max_backend_calls is not None:
        clean_reward_env.setenv("REWARD_MAX_BACKEND_CALLS", str(max_backend_calls))
    settings = Settings()
    max_batch = 32
    callers = 2 * max_batch

    async def run() -> tuple[list[int], list[int], list[np.ndarray]]:
        inner = Gated()
        metrics = GatewayMetrics()
        guard = guarded_backend(
            inner,
            settings,
            identity=IdentityCheck("h", ("image_encoder",)),
            max_batch=max_batch,
            embed_dim=D,
            metrics=metrics,
            calls=CallBound(settings.max_backend_calls, metrics),
        )
        tasks = [asyncio.create_task(guard.encode_images(x)) for x in images_of(*range(callers))]
        queues = guard.backend.queues
        while sum(len(q.waiting) for q in queues.values()) + sum(inner.calls) < callers:
            await asyncio.sleep(0.01)  # every caller arrived: out, or waiting to be merged
        out_before = list(inner.calls)
        await inner.release()
        return out_before, inner.calls, await asyncio.gather(*tasks)

    out_before, calls, outs = bounded(run())
    # one merged call out (merged_calls_in_flight; the callers the shared identity check let
    # through first, up to the max batch), then the waiting callers in full merged calls
    first = out_before[0]
    assert len(out_before) == 1 and first <= max_batch, out_before
    rest = callers - first
    assert calls[1:] == [max_batch] * (rest // max_batch) + (
        [rest % max_batch] if rest % max_batch else []
    )
    assert [o[:, 0].tolist() for o in outs] == [[k] for k in range(callers)]


def test_the_bound_on_calls_out_is_shared_by_every_model_of_the_export(
    clean_reward_env: pytest.MonkeyPatch,
) -> None:
    """Two models (an ensemble's members) with a bound of one call: while one model's call is
    out, the other's waits, and the in-use gauge says one."""

    async def run() -> tuple[list[list[int]], list[float | None], list[np.ndarray]]:
        metrics = GatewayMetrics()
        settings = Settings()
        models = [Gated(), Gated()]
        calls = CallBound(1, metrics)
        guards = [
            guarded_backend(
                inner,
                settings,
                identity=IdentityCheck("h", ("image_encoder",)),
                max_batch=8,
                embed_dim=D,
                metrics=metrics,
                calls=calls,
                member=k > 0,
            )
            for k, inner in enumerate(models)
        ]

        def in_use() -> float | None:
            labels = {"limit": "backend_calls"}
            return metrics.registry.get_sample_value("reward_gateway_admission_in_use", labels)

        tasks = [asyncio.create_task(g.encode_images(x)) for g in guards for x in images_of(1, 2)]
        while not any(inner.calls for inner in models):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the other model's merged call waits for the one slot
        out = [len(inner.calls) for inner in models]
        seen = [in_use()]
        for inner in models:
            await inner.release()
        outs = await asyncio.gather(*tasks)
        seen.append(in_use())
        return [out, [sum(inner.calls) for inner in models]], seen, outs

    (out, rows), seen, outs = bounded(run())
    assert sorted(out) == [0, 1]  # one model's call out, the other's not sent
    assert seen == [1, 0]
    assert rows == [2, 2]
    assert [int(o[0, 0]) for o in outs] == [1, 2, 1, 2]


def test_merged_calls_respect_max_rows_and_bytes_and_never_mix_shapes():
    async def run() -> tuple[list[int], list[np.ndarray]]:
        inner = Gated()
        await inner.release()
        merged = CoalescingBackend(inner, max_rows=3, max_bytes=1 << 30, max_in_flight=4)
        small = images_of(1, 2, 3, 4, 5, 6, 7)
        large = images_of(8, 9, size=16)
        outs = await asyncio.gather(*(merged.encode_images(x) for x in [*small, *large]))
        by_bytes = CoalescingBackend(inner, max_rows=64, max_bytes=2 * 192, max_in_flight=4)
        await asyncio.gather(*(by_bytes.encode_images(x) for x in images_of(1, 2, 3)))
        return inner.calls, outs

    calls, outs = bounded(run())
    assert calls[:4] == [3, 3, 1, 2]  # 7 small images in 3s; the two 16-px ones apart
    assert calls[4:] == [2, 1]  # two 8-px images (192 bytes each) per call
    assert [int(o[0, 0]) for o in outs] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_reward_outputs_are_split_back_per_caller():
    async def run() -> list[dict[str, np.ndarray]]:
        inner = Gated()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)

        def call(value: float, scale: float, rows: int = 1):
            return merged.rewards(
                np.full((rows, D), value, np.float32),
                np.zeros((rows, 33, D), np.float32),
                np.ones((rows, 33), bool),
                np.full((rows, 1), scale, np.float32),
                np.zeros((rows, 1), np.float32),
            )

        first = asyncio.create_task(call(1.0, 1.0))
        await settle()
        rest = [asyncio.create_task(call(2.0, 10.0, rows=2)), asyncio.create_task(call(3.0, 5.0))]
        await settle()
        await inner.release()
        outs = await asyncio.gather(first, *rest)
        assert inner.calls == [1, 3]
        return outs

    outs = bounded(run())
    assert [o["RAW"][:, 0].tolist() for o in outs] == [[1.0], [20.0, 20.0], [15.0]]
    assert [o["TEXTNORM"].shape for o in outs] == [(1, 1), (2, 1), (1, 1)]


def test_a_wrong_row_count_or_an_error_fails_every_caller_of_the_merged_call():
    async def run(inner: Gated) -> list[object]:
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)
        tasks = [asyncio.create_task(merged.encode_images(x)) for x in images_of(1, 2, 3)]
        await settle()
        await inner.release()
        return await asyncio.gather(*tasks, return_exceptions=True)

    # the backend loses a row of the merged call [2, 3]: neither caller may get the other's
    outs = bounded(run(Gated(drop_rows=1)))
    assert isinstance(outs[0], BackendError)  # the lone first call lost its only row
    assert all(isinstance(o, BackendError) and "2 rows" in str(o) for o in outs[1:]), outs
    failure = BackendError("image_encoder: boom")
    outs = bounded(run(Gated(fail=failure)))
    assert all(type(o) is BackendError and str(o) == str(failure) for o in outs), outs
    assert len({id(o) for o in outs}) == 3  # each caller its own copy (its own traceback)


def test_a_caller_that_gives_up_leaves_the_others_untouched():
    async def run() -> tuple[list[int], list[object]]:
        inner = Gated()
        metrics = GatewayMetrics()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)
        guard = GuardedBackend(
            merged,
            identity=IdentityCheck("h", ("image_encoder",)),
            timeout_s=0.2,
            max_batch=64,
            embed_dim=D,
            metrics=metrics,
        )
        first = asyncio.create_task(merged.encode_images(images_of(1)[0]))
        await settle()
        waiting = [asyncio.create_task(merged.encode_images(x)) for x in images_of(2, 3)]
        impatient = asyncio.create_task(guard.encode_images(images_of(4)[0]))  # times out
        await settle()
        waiting[0].cancel()  # its request went away before the merged call was sent
        await asyncio.sleep(0.4)
        await inner.release()
        outs = await asyncio.gather(first, *waiting, impatient, return_exceptions=True)
        return inner.calls, outs

    calls, (first, cancelled, third, impatient) = bounded(run())
    # both gave up before the merged call went out: only the third caller's row was sent
    assert calls == [1, 1]
    assert first[:, 0].tolist() == [1] and third[:, 0].tolist() == [3]
    assert isinstance(cancelled, asyncio.CancelledError)
    assert isinstance(impatient, BackendTimeout)


def test_everything_but_inference_is_the_wrapped_backend_s():
    inner = Gated()
    inner.models = ("image_encoder", "text_encoder", "reward_head")
    merged = CoalescingBackend(inner, max_rows=8, max_bytes=1 << 30, max_in_flight=2)
    assert merged.models == inner.models
    assert bounded(merged.export_hashes(["a"])) == {"a": "h"}
    with pytest.raises(AttributeError):
        merged.no_such_attribute  # noqa: B018


def test_a_caller_that_times_out_while_its_merged_call_is_out_costs_the_others_nothing():
    async def run() -> tuple[list[int], list[object]]:
        inner = Gated()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)
        guard = GuardedBackend(
            merged,
            identity=IdentityCheck("h", ("image_encoder",)),
            timeout_s=0.3,
            max_batch=64,
            embed_dim=D,
            metrics=GatewayMetrics(),
        )
        blocker = asyncio.create_task(merged.encode_images(images_of(1)[0]))
        await settle()
        impatient = asyncio.create_task(guard.encode_images(images_of(4)[0]))
        patient = asyncio.create_task(merged.encode_images(images_of(5)[0]))
        await asyncio.sleep(0.1)  # both wait behind the blocker
        await inner.release(1)  # the blocker returns; the two go out together and stay out
        await asyncio.sleep(0.4)  # the guard's 0.3 s runs out meanwhile
        await inner.release()
        outs = await asyncio.gather(blocker, impatient, patient, return_exceptions=True)
        return inner.calls, outs

    calls, (blocker, impatient, patient) = bounded(run())
    assert calls == [1, 2]
    assert blocker[:, 0].tolist() == [1] and patient[:, 0].tolist() == [5]
    assert isinstance(impatient, BackendTimeout)


class Hanging(Gated):
    """Hangs (never answers, no deadline of its own) until `recovered`."""

    def __init__(self) -> None:
        super().__init__()
        self.recovered = False

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        if not self.recovered:
            self.calls.append(len(images))
            await asyncio.Event().wait()
        return np.repeat(images[:, 0, 0, :1].astype(np.float32), D, axis=1)


def test_a_hung_backend_does_not_keep_the_queue_after_it_recovers():
    async def run() -> tuple[int, np.ndarray, dict]:
        inner = Hanging()
        merged = CoalescingBackend(
            inner, max_rows=64, max_bytes=1 << 30, max_in_flight=2, timeout_s=30
        )
        guard = GuardedBackend(
            merged,
            identity=IdentityCheck("h", ("image_encoder",)),
            timeout_s=0.2,
            max_batch=64,
            embed_dim=D,
            metrics=GatewayMetrics(),
        )
        hung = []
        for k in range(3):  # two fill both slots, the third waits behind them; all time out
            hung.append(asyncio.create_task(guard.encode_images(images_of(k)[0])))
            await settle()
        results = await asyncio.gather(*hung, return_exceptions=True)
        assert all(isinstance(r, BackendTimeout) for r in results), results
        await settle()  # the abandoned merged calls were cancelled: their slots are free
        inner.recovered = True
        out = await guard.encode_images(images_of(7)[0])
        await settle()
        return len(inner.calls), out, dict(merged.queues)

    sent, out, queues = bounded(run())
    # two calls hung; the third went out too only if a cancelled call freed its slot before
    # its own deadline (a race of milliseconds on a busy host)
    assert sent in (2, 3)
    assert out[:, 0].tolist() == [7]
    assert queues == {}  # an idle queue is dropped


def test_a_merged_call_past_its_own_deadline_fails_its_callers_with_a_timeout():
    async def run() -> list[object]:
        merged = CoalescingBackend(
            Hanging(), max_rows=64, max_bytes=1 << 30, max_in_flight=1, timeout_s=0.1
        )
        calls = [merged.encode_images(x) for x in images_of(1, 2)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outs = bounded(run())
    assert all(isinstance(o, BackendTimeout) and "0.1 s" in str(o) for o in outs), outs


# -- found by review 2026-12-07 ------------------------------------------------------------------
class Hung(Gated):
    """Never answers the identity check (a blackholed Triton); counts the checks."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    async def export_hashes(self, models):
        self.checks += 1
        await asyncio.Event().wait()


def test_callers_share_one_identity_check_and_its_failure_with_the_backend_hung():
    """Ten requests against a hung backend all fail after one check's timeout (0.2 s), not
    one after another (the k-th after k × 0.2 s); one check went out."""
    import time

    async def run() -> tuple[list[float], int]:
        inner = Hung()
        guard = GuardedBackend(inner, identity=IdentityCheck("h", ("image_encoder",)),
                               timeout_s=0.2, max_batch=8, embed_dim=D,
                               metrics=GatewayMetrics())  # fmt: skip
        start = time.monotonic()

        errors: list[BaseException] = []

        async def one() -> float:
            with pytest.raises(BackendTimeout) as raised:
                await guard.encode_images(images_of(1)[0])
            errors.append(raised.value)
            return time.monotonic() - start

        took = await asyncio.gather(*(one() for _ in range(10)))
        assert len({id(e) for e in errors}) == 10  # each its own copy, not one shared traceback
        return took, inner.checks

    took, checks = bounded(run())
    assert checks == 1
    assert max(took) < 0.6, took


def test_a_failed_chunk_cancels_the_requests_other_backend_calls():
    """A batch split into 4 chunks whose first fails: the other 3 are cancelled, their slots
    given back at once, none left running for nobody."""

    class FirstFails(Gated):
        def __init__(self) -> None:
            super().__init__()
            self.finished = 0

        async def encode_images(self, images: np.ndarray) -> np.ndarray:
            if images[0, 0, 0, 0] == 0:
                raise BackendError("chunk 0 refused")
            await asyncio.sleep(0.3)
            self.finished += 1
            return np.ones((len(images), D), np.float32)

    async def run() -> tuple[int, int]:
        metrics = GatewayMetrics()
        inner, bound = FirstFails(), CallBound(64, metrics)
        merged = CoalescingBackend(inner, max_rows=1, max_bytes=1 << 30, max_in_flight=8,
                                   timeout_s=30, bound=bound)  # fmt: skip
        guard = GuardedBackend(merged, identity=IdentityCheck("h", ("image_encoder",)),
                               timeout_s=30, max_batch=1, embed_dim=D, metrics=metrics)  # fmt: skip
        with pytest.raises(BackendError, match="chunk 0 refused"):
            await guard.encode_images(np.concatenate(images_of(0, 1, 2, 3)))
        await settle()
        out_after_failure = bound.in_flight
        await asyncio.sleep(0.5)
        return out_after_failure, inner.finished

    out_after_failure, finished = bounded(run())
    assert (out_after_failure, finished) == (0, 0)


def test_a_large_merge_is_concatenated_off_the_event_loop_and_rows_stay_each_callers(
    monkeypatch,
):
    import threading

    from service.gateway import coalescing

    threads: list[str] = []
    original = coalescing._concatenated

    def recording(batch):
        threads.append(threading.current_thread().name)
        return original(batch)

    monkeypatch.setattr(coalescing, "_concatenated", recording)

    async def run(size: int) -> list[np.ndarray]:
        inner = Gated()
        merged = CoalescingBackend(inner, max_rows=64, max_bytes=1 << 30, max_in_flight=1)
        first = asyncio.create_task(merged.encode_images(images_of(100, size=size)[0]))
        await settle()
        rest = [asyncio.create_task(merged.encode_images(x)) for x in images_of(7, 9, size=size)]
        await settle()
        await inner.release()
        return await asyncio.gather(first, *rest)

    big = int((coalescing.OFF_LOOP_BYTES / 3) ** 0.5) + 8  # two callers' images: over the bound
    for size, off_loop in ((8, False), (big, True)):
        threads.clear()
        outs = bounded(run(size))
        assert [o[:, 0].tolist() for o in outs] == [[100], [7], [9]]
        assert len(threads) == 1 and (threads[0] != "MainThread") == off_loop, threads
